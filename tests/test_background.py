"""The figure worker (``callbacks._background``): figures drawn and written beside training, never lost, never fatal.

Each fit here is a real Lightning fit writing real TensorBoard events, read back with TensorBoard's
``EventAccumulator``.
"""

import functools
import io
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from callbacks import ActivationMonitor, GradientMonitor, HealthWarning, ParameterMonitor, UpdateRatioMonitor
from callbacks._background import Worker, close_runs, figure_process_cpu, render, worker
from tests.callbacks_helpers import (
    TanhMLP,
    fixed_loader,
    read_events,
    read_figures,
    run_two_process_script,
    saturating_batch,
    trainer,
)

TAGS = ("activation/distribution", "activation_grad/distribution", "param_grad/distribution", "update_ratio/history")


def four(every: int = 2) -> list:
    return [
        ActivationMonitor(every_n_steps=every, histogram_every_n_steps=every),
        GradientMonitor(every_n_steps=every, histogram_every_n_steps=every),
        ParameterMonitor(every_n_steps=every, histogram_every_n_steps=every),
        UpdateRatioMonitor(every_n_steps=every),
    ]


def images(acc, tag: str) -> dict[int, np.ndarray]:
    """The images of ``tag`` by step, decoded from the event file's PNGs."""
    return {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in acc.Images(tag)}


# ---------------------------------------------------------------------------------------------- the worker
def test_worker_runs_jobs_in_order_on_its_own_thread_and_flush_waits_for_them():
    w = Worker(max_jobs=2)
    seen: list[tuple[int, str]] = []
    for i in range(5):  # more jobs than the queue holds: submit blocks until the worker takes one, nothing dropped
        w.submit(lambda i=i: (time.sleep(0.01), seen.append((i, threading.current_thread().name))), print)
    w.flush()
    assert seen == [(i, "callbacks-figures") for i in range(5)]


def test_worker_hands_a_failing_job_to_its_on_error_and_goes_on():
    w = Worker()
    errors: list[Exception] = []
    done: list[int] = []
    w.submit(lambda: 1 / 0, errors.append)
    w.submit(lambda: done.append(1), errors.append)
    w.flush()
    assert [type(e) for e in errors] == [ZeroDivisionError] and done == [1]


def test_flush_without_a_job_returns_and_starts_no_thread():
    w = Worker(name="never-started")
    w.flush()
    assert not w.running and "never-started" not in {t.name for t in threading.enumerate()}


@pytest.mark.parametrize("max_jobs", [0, -1, 1.5, True])
def test_worker_rejects_a_bad_queue_size(max_jobs):
    with pytest.raises(ValueError, match="Expected `max_jobs` to be an int >= 1"):
        Worker(max_jobs=max_jobs)


def test_an_image_event_reads_back_as_the_pixels_add_image_writes(tmp_path, monkeypatch):
    # the figure process writes its PNGs at zlib level 1 through the file writer (callbacks._internals): TensorBoard
    # reads back the pixels, size and step `add_image` writes; elsewhere (an untested torch) it is `add_image`
    from torch.utils.tensorboard import SummaryWriter

    from callbacks import _internals
    from callbacks._background import _write_images

    rng = np.random.default_rng(0)
    picture = np.zeros((120, 160, 3), dtype=np.uint8)
    picture[20:60, 30:90] = (31, 119, 180)  # flat colours, like a figure, and noise that compresses badly
    picture[80:] = rng.integers(0, 256, size=(40, 160, 3), dtype=np.uint8)
    theirs = SummaryWriter(str(tmp_path / "add_image"))
    theirs.add_image("fig", picture, global_step=7, dataformats="HWC")
    theirs.close()
    tested = _internals.TORCH_IS_TESTED  # (another torch: `add_image` both times)
    writers: dict = {}
    _write_images(writers, (str(tmp_path / "event"),), "fig", picture, 7)
    monkeypatch.setattr(_internals, "TORCH_IS_TESTED", False)
    _write_images(writers, (str(tmp_path / "fallback"),), "fig", picture, 7)
    for w in writers.values():
        w.close()
    read = {d: read_events(str(tmp_path / d)).Images("fig") for d in ("add_image", "event", "fallback")}
    for events in read.values():
        (e,) = events
        assert (e.step, e.width, e.height) == (7, 160, 120)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(e.encoded_image_string))), picture)
    ours, fallback = read["event"][0].encoded_image_string, read["fallback"][0].encoded_image_string
    assert fallback == read["add_image"][0].encoded_image_string and (ours != fallback) == tested  # (zlib level)


# ---------------------------------------------------------------------------------------------- in a fit
def test_figures_of_step_zero_and_end_of_fit_are_on_disk_after_the_fit(tmp_path):
    monitors = four(every=2)
    t = trainer(tmp_path, monitors, max_steps=5, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 5))
    acc, figures = read_events(t.logger.log_dir), read_figures(t.logger.log_dir)
    # step 0 (the initialisation) and the end-of-fit figure, from the last data recorded: the last histograms
    # (step 4, the fit's last step) for the distributions, the last update ratios (step 3) for their history
    last_histogram = max(e.step for e in acc.Histograms("activation/act"))
    last_ratio = max(e.step for e in acc.Scalars("update_ratio/hidden.weight"))
    assert (last_histogram, last_ratio) == (4, 3)
    for tag in TAGS:
        shots = images(figures, tag)
        last = last_ratio if tag.startswith("update_ratio") else last_histogram
        assert 0 in shots and last in shots, (tag, sorted(shots))
        assert all(img.shape[1] == 680 and img.shape[2] in (3, 4) for img in shots.values())
    # drawn from the data of their own step: the activation figure of step 4 is the one the probe draws now
    from callbacks.figures import figure_to_array

    expected = figure_to_array(monitors[0].probe.draw())
    assert np.array_equal(images(figures, "activation/distribution")[4][..., :3], expected)


def no_font() -> None:
    raise RuntimeError("no font")


@pytest.mark.parametrize(
    "drawing",
    [
        pytest.param(lambda: no_font, id="in-the-figure-process"),  # a module's function pickles
        pytest.param(lambda: lambda: no_font(), id="on-the-worker-thread"),  # a closure does not
    ],
)
def test_a_figure_that_raises_is_reported_once_and_training_finishes(tmp_path, drawing):
    monitors = four(every=1)
    monitors[0].probe.drawing = drawing  # a probe whose figure crashes (e.g. a user's own probe, a broken matplotlib)
    t = trainer(tmp_path, monitors, max_steps=6, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 6))
    assert t.global_step == 6
    reports = [str(w.message) for w in caught if issubclass(w.category, HealthWarning) and "figure" in str(w.message)]
    assert len(reports) == 1, reports
    assert "activation/distribution" in reports[0] and "RuntimeError: no font" in reports[0]
    acc = read_figures(t.logger.log_dir)
    assert "activation/distribution" not in acc.Tags()["images"]
    assert 0 in images(acc, "activation_grad/distribution")  # the other figures are written as before


class FailsAtStep(TanhMLP):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.fail_at = step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.fail_at:
            raise RuntimeError("out of memory, say")
        return super().training_step(batch, batch_idx)


def slowly(draw):
    time.sleep(0.5)  # still drawing when the fit raises: the flush on the exception waits for it
    return draw()


def test_a_fit_that_raises_after_a_figure_step_still_has_the_figure(tmp_path):
    monitors = four(every=10)
    probe = monitors[0].probe
    drawing = probe.drawing
    probe.drawing = lambda: functools.partial(slowly, drawing())
    t = trainer(tmp_path, monitors, max_steps=5, log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        t.fit(FailsAtStep(1), fixed_loader(saturating_batch(), 5))
    acc = read_figures(t.logger.log_dir)
    assert sorted(images(acc, "activation/distribution")) == [0]


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from callbacks import ActivationMonitor
    from callbacks._background import worker
    from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch

    class Kill(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                worker().flush()  # the figure of step 0 has been written by the worker (and flushed by it)
                os.kill(os.getpid(), signal.SIGKILL)  # no teardown, no logger finalize

    t = L.Trainer(accelerator="cpu", max_steps=5, logger=TensorBoardLogger(sys.argv[1], name="run", version=0),
                  callbacks=[ActivationMonitor(every_n_steps=10), Kill()], enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 5))
    """
)


def test_a_run_killed_after_a_figure_step_still_has_the_figure(tmp_path):
    proc = run_two_process_script(tmp_path, KILLED_SCRIPT)
    assert proc.returncode == -9, proc.stderr[-3000:]
    acc = read_figures(str(tmp_path / "run" / "version_0"))
    assert sorted(images(acc, "activation/distribution")) == [0]


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger
    from callbacks import ActivationMonitor, UpdateRatioMonitor
    from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch

    class Threads(Callback):  # which threads each rank runs at the end of fit
        def on_train_end(self, trainer, pl_module):
            names = sorted(t.name for t in threading.enumerate())
            with open(f"{sys.argv[1]}/threads-{trainer.global_rank}.txt", "w") as f:
                f.write("\\n".join(names))

    if __name__ == "__main__":
        t = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, log_every_n_steps=1,
                      logger=TensorBoardLogger(sys.argv[1], name="ddp", version=0),
                      callbacks=[ActivationMonitor(every_n_steps=1), UpdateRatioMonitor(every_n_steps=1), Threads()],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 6))
    """
)


@pytest.mark.slow
def test_only_rank_zero_runs_a_figure_worker_under_ddp(tmp_path):
    proc = run_two_process_script(tmp_path, DDP_SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "callbacks-figures" in (tmp_path / "threads-0.txt").read_text().split("\n")
    assert "callbacks-figures" not in (tmp_path / "threads-1.txt").read_text().split("\n")
    acc = read_figures(str(tmp_path / "ddp" / "version_0"))
    assert 0 in images(acc, "activation/distribution") and 0 in images(acc, "update_ratio/history")


def test_the_process_has_one_worker():
    assert worker() is worker()


def test_a_drawing_that_does_not_pickle_is_drawn_here_the_same():
    from callbacks.figures import plot_update_ratios

    history = {"w": [-3.0, -2.5, -2.8]}
    in_process = render(functools.partial(plot_update_ratios, history, [0, 10, 20]))
    here = render(lambda: plot_update_ratios(history, [0, 10, 20]))  # a closure: drawn on this thread
    assert in_process.shape == here.shape and in_process.dtype == np.uint8
    assert np.array_equal(in_process, here)
    assert figure_process_cpu() > 0  # the first one was drawn in the figure process


def layer_lines(log_dir: str, series: str) -> dict[str, dict[int, float]]:
    """Each layer run's values of ``series`` by step, read from ``{log_dir}/layers/*``."""
    import os

    root = os.path.join(log_dir, "layers")
    out = {}
    for layer in sorted(os.listdir(root)):
        acc = read_events(os.path.join(root, layer))
        if series in acc.Tags()["scalars"]:
            out[layer] = {e.step: e.value for e in acc.Scalars(series)}
    return out


@pytest.mark.parametrize("helper", [True, False], ids=["by-the-figure-process", "here-once-it-has-failed"])
def test_figures_and_layer_runs_are_written_by_the_figure_process_or_here(tmp_path, monkeypatch, helper):
    import callbacks._background as background

    if not helper:
        monkeypatch.setattr(background, "_PROCESS_FAILED", True)  # as after the helper died: written here
    monitors = four(every=2)
    t = trainer(tmp_path, monitors, max_steps=6, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 6))
    log_dir = t.logger.log_dir
    # every layer line equals the full tag the main run (written here, by the logger's writer) has for that step
    main = read_events(log_dir)
    lines = layer_lines(log_dir, "update_ratio")
    assert lines, "no layer run written"
    for layer, values in lines.items():
        full = {e.step: e.value for e in main.Scalars(f"update_ratio/{layer}")}
        assert values == full and {1, 3, 5} <= set(values), layer
    shots = images(read_figures(log_dir), "activation/distribution")
    assert 0 in shots and 5 in shots
    assert all(img.shape[1] == 680 for img in shots.values())


def test_layer_scalars_are_kept_then_sent_together_and_on_disk_once_closed(tmp_path, monkeypatch):
    import os

    import callbacks._background as background

    background.send_scalars()  # (whatever an earlier test kept)
    monkeypatch.setattr(background, "SCALARS_EVERY_S", 3600.0)
    monkeypatch.setattr(background, "_SCALARS_SENT", [time.monotonic()])  # just sent: the next ones are kept
    folder = str(tmp_path / "layers" / "net.0")
    for step in range(3):
        background.write_scalars({folder: {"update_ratio": -3.0 + step}}, step)
    assert not os.path.exists(folder) and len(background._SCALARS) == 3  # nothing sent yet
    close_runs([folder])  # sends what is kept, then closes the folder's writer in the figure process
    values = {e.step: e.value for e in read_events(folder).Scalars("update_ratio")}
    assert values == {0: -3.0, 1: -2.0, 2: -1.0} and not background._SCALARS
