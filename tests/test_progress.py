"""StepProgressBar in a notebook, read as a Jupyter front end reads it: the messages of a real IPython kernel.

Each fit runs in a real kernel (jupyter_client starts ipykernel, as Jupyter, VS Code and nbclient do) with the real
Lightning Trainer on a tiny model. What the kernel sends on its IOPub channel is what a front end draws: a
``display_data`` message opens an output, an ``update_display_data`` with the same ``display_id`` replaces it in
place, and a ``stream`` message appends lines. The console bar has its own tests (tests/test_console.py, on a real
pseudo-terminal); here it is checked that a notebook does not change it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_makemore.progress import NOTEBOOK_COLUMNS, BarView, StepProgressBar
from tests.conftest import ROOT

BATCHES = 8  # an epoch of the tiny model: a fit of 40 steps runs through 5 epochs, validation after each
RESULT = "RESULT "  # the kernel prints the fit's own numbers on a line starting so


class Tiny(L.LightningModule):
    """A linear regression on 64 fixed points: 8 steps an epoch, a `loss` and a `val/loss` on the bar.

    Args:
        sleep: seconds each training step sleeps.
        slow_from: from this step on, each training step sleeps `slow_sleep` seconds instead (the run slows down).
        slow_sleep: seconds.
    """

    def __init__(self, sleep: float = 0.0, slow_from: int | None = None, slow_sleep: float = 0.0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.sleep, self.slow_from, self.slow_sleep = sleep, slow_from, slow_sleep
        gen = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(8 * BATCHES, 4, generator=gen), torch.randn(8 * BATCHES, 1, generator=gen)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        slow = self.slow_from is not None and self.global_step >= self.slow_from
        time.sleep(self.slow_sleep if slow else self.sleep)
        loss = torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


class Clock(L.Callback):
    """The fit's time by its own clock: from training's start to the end of each step (it runs before the bar)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        self.at[trainer.global_step] = time.perf_counter() - self.started


def fit(max_steps: int, validate: bool = True, model: dict[str, Any] | None = None, **bar: Any) -> None:
    """Fits `Tiny(**model)` with a StepProgressBar (`bar`: its arguments) refreshed every step; prints the fit's
    numbers: whether the bar is a notebook one, and the clock at each step's end."""
    clock, progress = Clock(), StepProgressBar(refresh_rate=1, **bar)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[clock, progress],
        limit_val_batches=None if validate else 0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(**(model or {})))
    print(RESULT + json.dumps({"notebook": progress.notebook, "at": clock.at}))


def validate(**bar: Any) -> None:
    """`trainer.validate` of `Tiny` (4 batches) with a StepProgressBar (`bar`: its arguments)."""
    trainer = L.Trainer(callbacks=[StepProgressBar(refresh_rate=1, **bar)], logger=False, enable_model_summary=False)
    trainer.validate(Tiny(), verbose=False)


# ---------------------------------------------------------------------------------------------------------
# a real kernel, and what it sends


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if importlib.util.find_spec("ipykernel") is None or importlib.util.find_spec("jupyter_client") is None:
        pytest.skip("needs ipykernel and jupyter_client: pip install -e '.[test]' (make setup does)")
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path_factory.mktemp("kernel")))
    try:
        run(kc, f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom tests.test_progress import fit, validate")
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc: Any, code: str) -> list[dict[str, Any]]:
    """Runs `code` in the kernel; returns the IOPub messages it sent (outputs, not the kernel's status)."""
    messages: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=300, output_hook=messages.append)
    errors = [m["content"] for m in messages if m["msg_type"] == "error"]
    assert reply["content"]["status"] == "ok", errors
    return [m for m in messages if m["msg_type"] in ("stream", "display_data", "update_display_data")]


def kernel_fit(kc: Any, **kwargs: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`fit(**kwargs)` in the kernel: its output messages, and the numbers it printed."""
    messages = run(kc, f"fit(**{kwargs!r})")
    printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    (line,) = [x for x in printed.splitlines() if x.startswith(RESULT)]
    result = json.loads(line[len(RESULT) :])
    result["at"] = {int(k): v for k, v in result["at"].items()}
    return messages, result


def bar_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["msg_type"] in ("display_data", "update_display_data")]


def stream_text(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


# ---------------------------------------------------------------------------------------------------------
# in a notebook


def test_one_output_updated_in_place_for_the_whole_fit(kernel):
    """40 steps over 5 epochs, validation after each, every step redrawn (min_interval=0): one output, opened
    once and replaced in place; no bar for the sanity check or validation, nothing written as lines."""
    messages, result = kernel_fit(kernel, max_steps=40, min_interval=0)
    assert result["notebook"] is True  # detected: this process is a kernel
    shown = bar_messages(messages)
    assert [m["msg_type"] for m in shown[:1]] == ["display_data"]
    assert all(m["msg_type"] == "update_display_data" for m in shown[1:])
    ids = {m["content"]["transient"]["display_id"] for m in shown}
    assert len(ids) == 1  # one output: every update replaces the one display
    assert len(shown) >= 41  # the start, then each of the 40 steps
    for step in range(1, 41):  # each step's state was drawn, in order
        assert any(f" {step}/40 [" in m["content"]["data"]["text/plain"] for m in shown), step
    last = shown[-1]["content"]["data"]
    assert re.match(r"Training: 100%\|#+\| 40/40 \[", last["text/plain"]), last["text/plain"]
    assert len(last["text/plain"]) <= NOTEBOOK_COLUMNS
    assert '<progress value="40" max="40"' in last["text/html"]
    assert "Training 40/40 [" in last["text/html"] and "val/loss=" in last["text/html"]  # validation: in the postfix
    written = stream_text(messages)
    assert "it/s" not in written and "\r" not in written and "Validation" not in written  # no bar as text
    assert "`Trainer.fit` stopped: `max_steps=40` reached." in written  # Lightning's last line, after the bar


def test_redrawn_at_most_every_min_interval(kernel):
    """A refresh every step, but a draw only when min_interval has passed since the last one (the start and the
    end are always drawn): with an hour, the 40 steps' 40 refreshes draw none between the start and the end."""
    messages, _ = kernel_fit(kernel, max_steps=40, min_interval=3600)
    texts = [m["content"]["data"]["text/plain"] for m in bar_messages(messages)]
    assert not [t for t in texts if re.search(r" ([1-9]|[1-3]\d)/40 \[", t)], texts  # no step between 0 and 40
    assert any(" 0/40 [" in t for t in texts) and " 40/40 [" in texts[-1], texts
    assert len(texts) == 4  # the first state, the start (its total is new), the first at 100 %, the close

    # 0.1 s apart, 60 steps of 0.02 s: a draw needs 0.1 s since the one before, so there are at most as many as
    # the elapsed time holds tenths, plus the forced ones (the start; the end: last step, epoch end, close)
    messages, result = kernel_fit(kernel, max_steps=60, validate=False, model={"sleep": 0.02}, min_interval=0.1)
    texts = [m["content"]["data"]["text/plain"] for m in bar_messages(messages)]
    drawn = [int(n) for t in texts for n in re.findall(r" (\d+)/60 \[", t)]
    elapsed = result["at"][60]
    assert 3 <= len(drawn) <= elapsed / 0.1 + 1 + 4, (drawn, elapsed)
    assert drawn == sorted(drawn) and drawn[0] == 0 and drawn[-1] == 60


def test_rate_is_the_steps_over_the_time_since_the_start(kernel):
    """The last 30 of 60 steps are ten times slower: the bar's rate is the 60 steps over the whole time, not
    the recent speed a moving average would show."""
    model = {"sleep": 0.01, "slow_from": 30, "slow_sleep": 0.1}
    messages, result = kernel_fit(kernel, max_steps=60, validate=False, model=model, min_interval=0)
    at = result["at"]
    true_rate = 60 / at[60]  # by the fit's own clock
    recent_rate = 30 / (at[60] - at[30])
    assert recent_rate < 0.8 * true_rate  # the run did slow down: the two readings differ
    last = bar_messages(messages)[-1]["content"]["data"]
    shown = re.search(r"([\d.]+)it/s", last["text/html"]).group(1)
    assert float(shown) == pytest.approx(true_rate, rel=0.1), (last["text/html"], true_rate, recent_rate)
    assert re.search(r"([\d.]+)it/s", last["text/plain"]).group(1) == shown  # the plain text says the same

    # half way, before the slow steps: the time left predicted is the remaining 30 steps at the rate so far
    half = next(m for m in bar_messages(messages) if " 30/60 [" in m["content"]["data"]["text/plain"])
    meter = re.search(r" 30/60 \[(\d+):(\d+)<(\d+):(\d+), *([\d.]+)it/s", half["content"]["data"]["text/plain"])
    assert meter, half["content"]["data"]["text/plain"]
    assert float(meter.group(5)) == pytest.approx(30 / at[30], rel=0.1)


def test_validate_alone_has_a_bar_of_its_own(kernel):
    """Outside fit, `trainer.validate` shows its own bar: one output, ending at its 4 batches."""
    shown = bar_messages(run(kernel, "validate(min_interval=0)"))
    assert [m["msg_type"] for m in shown[:1]] == ["display_data"]
    assert len({m["content"]["transient"]["display_id"] for m in shown}) == 1
    last = shown[-1]["content"]["data"]
    assert "Validation" in last["text/html"] and " 4/4 [" in last["text/plain"], last


def test_console_bar_in_a_kernel_writes_lines_and_no_display(kernel):
    """notebook=False: Lightning's tqdm bar as in a terminal (carriage returns on a stream), no display output."""
    messages, result = kernel_fit(kernel, max_steps=16, notebook=False)
    assert result["notebook"] is False
    assert bar_messages(messages) == []
    written = stream_text(messages)
    assert "Training: 100%" in written and "16/16 [" in written and "\r" in written


# ---------------------------------------------------------------------------------------------------------
# in this process (pytest: not a kernel)


def test_outside_a_kernel_the_bar_is_the_console_bar(capsys):
    progress = StepProgressBar(refresh_rate=4)
    assert progress.notebook is False
    trainer = L.Trainer(
        max_steps=16, callbacks=[progress], logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.fit(Tiny())
    out = capsys.readouterr()
    written = out.out + out.err
    assert "Training: 100%" in written and "16/16 [" in written
    assert "<progress" not in written


def test_bar_view_html_escapes_and_wraps():
    view = BarView(3, 10, "Training 3/10 [00:01<00:02, 3.00it/s, loss=<nan>]", "Training: 30%|###| 3/10")
    html = view._repr_html_()
    assert '<progress value="3" max="10"' in html and "loss=&lt;nan&gt;" in html
    assert "white-space:pre" not in html  # a line wider than the output wraps, it is not cut off
    assert repr(view) == "Training: 30%|###| 3/10"
    assert "<progress" not in BarView(3, None, "Training 3 [00:01, 3.00it/s]", "")._repr_html_()  # no total


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_interval": -1}, "Expected `min_interval` to be a number of seconds >= 0, but got -1."),
        ({"min_interval": "1s"}, "Expected `min_interval` to be a number of seconds >= 0, but got '1s'."),
        ({"min_interval": True}, "Expected `min_interval` to be a number of seconds >= 0, but got True."),
        ({"notebook": "yes"}, "Expected `notebook` to be a bool or None (detect), but got 'yes'."),
    ],
)
def test_bad_arguments_say_what_is_expected(kwargs, message):
    with pytest.raises(ValueError) as raised:
        StepProgressBar(**kwargs)
    assert str(raised.value) == message and "\n" not in message
