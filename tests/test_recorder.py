"""The recorder as practitioners use it: callbacks re-used across fits, activation checkpointing, data of unknown
length, and a checkpoint written by the monitors before the pipeline rewrite (tests/data/monitors_v1.ckpt)."""

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset

from callbacks import (
    ActivationMonitor,
    CallbackGroup,
    GradientMonitor,
    HealthMonitor,
    ParameterMonitor,
    UpdateRatioMonitor,
)
from callbacks.probes.base import Probe
from tests.callbacks_helpers import (
    TanhMLP,
    fixed_loader,
    histograms,
    read_events,
    read_figures,
    saturating_batch,
    scalars,
    trainer,
)

DATA = Path(__file__).parent / "data"


class Wide(TanhMLP):
    """TanhMLP with a wider head: other parameter shapes, the same names."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(super().forward(x))


def test_reused_callbacks_start_a_new_fit_clean(tmp_path):
    """The same monitor objects in a second fit (no checkpoint): no history, steps or warnings of the first."""
    activation = ActivationMonitor(every_n_steps=1, saturation_warning=0.2)
    ratio = UpdateRatioMonitor(every_n_steps=1)
    for run, model in (("first", TanhMLP()), ("second", Wide())):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path / run, [activation, ratio], max_steps=4).fit(model, fixed_loader(saturating_batch(), 4))
        saturated = [w for w in caught if "`act (Tanh)` is saturated" in str(w.message)]
        assert len(saturated) == 1, run  # an equally sick new model is warned about again
        assert ratio.steps == [0, 1, 2, 3], run
        names = {"hidden.weight", "head.weight"} | ({"extra.weight"} if run == "second" else set())
        assert set(ratio.history) == names and all(len(v) == 4 for v in ratio.history.values()), run
    rows = dict(ratio.probe.rows()[1])
    assert set(rows) == {"hidden.weight", "head.weight", "extra.weight"}  # the summary's table is the new model's


class Checkpointed(TanhMLP):
    """The tanh and the ReLU branch in one block run under activation checkpointing (recomputed in backward)."""

    def __init__(self, use_checkpoint: bool) -> None:
        super().__init__(unused=False)
        self.use_checkpoint = use_checkpoint

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x)
        z = self.hidden(x)
        return torch.cat([h, self.relu(torch.cat([z[:, :2] - 1e3, z[:, 2:]], dim=1))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = checkpoint(self._block, x, use_reentrant=False) if self.use_checkpoint else self._block(x)
        return self.head(y)


def test_activation_checkpointing_counts_each_forward_once(tmp_path):
    logs = {}
    for use in (False, True):
        torch.manual_seed(0)
        monitors = [ActivationMonitor(every_n_steps=1, histogram_every_n_steps=1), GradientMonitor(every_n_steps=1)]
        t = trainer(tmp_path / str(use), monitors, max_steps=3)
        t.fit(Checkpointed(use), fixed_loader(saturating_batch(16), 3))
        acc = read_events(t.logger.log_dir)
        logs[use] = {tag: scalars(acc, tag) for tag in acc.Tags()["scalars"]}, histograms(acc, "activation/act")
    (plain, plain_hist), (ckpt, ckpt_hist) = logs[False], logs[True]
    assert all(h.num == 16 * 8 for h in ckpt_hist.values())  # the batch once, not twice
    assert {s: list(h.bucket) for s, h in ckpt_hist.items()} == {s: list(h.bucket) for s, h in plain_hist.items()}
    assert plain.keys() == ckpt.keys() and "activation_grad/act/std" in ckpt
    for tag, values in plain.items():
        assert ckpt[tag] == pytest.approx(values, rel=1e-6), tag


class Stream(IterableDataset):
    """Batches of unknown number: Lightning cannot plan the fit's end."""

    def __iter__(self):
        x = saturating_batch(16)
        for _ in range(5):
            yield x, torch.arange(16) % 3


def test_data_of_unknown_length_gets_the_picture_at_initialisation(tmp_path):
    monitors = [ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()]
    t = trainer(tmp_path, monitors, max_epochs=2, log_every_n_steps=3)
    t.fit(TanhMLP(), DataLoader(Stream(), batch_size=None))
    assert t.global_step == 10
    acc = read_events(t.logger.log_dir)
    assert sorted(histograms(acc, "activation/act")) == [0]  # every 30 steps otherwise: never in this fit
    figures = read_figures(t.logger.log_dir)
    images = figures.Tags()["images"]
    for tag in ("activation/distribution", "activation_grad/distribution", "param_grad/distribution"):
        assert tag in images and [e.step for e in figures.Images(tag)] == [0], tag
    assert [e.step for e in figures.Images("update_ratio/history")][-1] == 8  # the last recorded step, at the end


def _v1_monitors() -> list:
    """The monitors (and arguments) of tests/data/make_monitors_ckpt.py."""
    return [
        ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4, saturation_warning=0.2),
        GradientMonitor(every_n_steps=2, histogram_every_n_steps=4),
        ParameterMonitor(every_n_steps=2, histogram_every_n_steps=4),
        UpdateRatioMonitor(every_n_steps=2, high=-1.6, patience=2),
    ]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "alone"])
def test_a_checkpoint_written_before_the_rewrite_resumes_with_its_curves_and_warnings(tmp_path, grouped):
    state = torch.load(DATA / "monitors_v1.ckpt", weights_only=False)
    old = state["callbacks"]["UpdateRatioMonitor{'params': [], 'min_ndim': 2}"]
    monitors = _v1_monitors()
    callbacks = [CallbackGroup(monitors)] if grouped else monitors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(tmp_path, callbacks, max_steps=12)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 16), ckpt_path=str(DATA / "monitors_v1.ckpt"))
    activation, _, _, ratio = monitors
    assert ratio.steps == [1, 3, 5, 7, 9, 11]  # the old curve, continued
    assert ratio.history["head.weight"][:4] == old["history"]["head.weight"]
    assert len(ratio.history["hidden.weight"]) == 6
    # what was warned before the checkpoint is not warned again, and is still in the summary
    assert not [w for w in caught if "is saturated" in str(w.message) or "updates are large" in str(w.message)]
    assert "saturation/act" in activation.state_dict()["warned"] and "lr/high" in ratio.state_dict()["warned"]
    assert "is saturated" in activation.part.summary_text(activation.probe, 11)
    # the resumed run's own logged steps, on the old axis
    acc = read_events(t.logger.log_dir)
    assert sorted(scalars(acc, "update_ratio/head.weight")) == [9, 11]


def test_a_probe_that_does_not_trace_is_called_only_on_the_steps_it_records(tmp_path):
    """HealthMonitor(trace=True) traces every step; only the probes with trace columns are called on a step that is
    only traced, so a probe without any never needs to check ``self in rec.moments``."""
    monitor = HealthMonitor(every_n_steps=3, histogram_every_n_steps=0, trace=True, report=False, warn=False)
    calls: list[tuple[str, int, bool]] = []  # (probe class, step, recorded on it): a spy, then the real method
    for probe in monitor.recorder.probes:
        for method in ("on_output", "before_optimizer_step", "end_step"):
            real = getattr(probe, method)

            def spy(rec: Any, *args: Any, _real: Any = real, _probe: Probe = probe) -> None:
                calls.append((type(_probe).__name__, rec.step, _probe in rec.moments))
                _real(rec, *args)

            setattr(probe, method, spy)
    t = trainer(tmp_path, [monitor], max_steps=7)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 7))
    traces = {type(p).__name__ for p in monitor.recorder.probes if type(p).trace_columns is not Probe.trace_columns}
    assert traces == {"ActivationProbe", "ParameterProbe", "UpdateProbe", "LossProbe"}
    silent = {name for name, _, _ in calls} - traces
    assert {"GradientProbe", "LossInputProbe"} <= silent
    # SGD, no attention module: the Adam and Transformer probes watch nothing and are never called (`watching`)
    assert not {"AdamEpsProbe", "AttentionProbe", "OutputLogitsProbe"} & {name for name, _, _ in calls}
    # steps 0 (initialisation), 2 and 5 (every 3) are recorded (no histograms: no final step); 1, 3, 4, 6 only traced
    assert {step for name, step, _ in calls if name in silent} == {0, 2, 5}
    assert all(recorded for name, _, recorded in calls if name in silent)
    assert {step for name, step, _ in calls if name == "LossProbe"} == set(range(7))  # the tracers: every step
    assert {step for name, step, recorded in calls if name == "ActivationProbe" and not recorded} == {1, 3, 4, 6}
