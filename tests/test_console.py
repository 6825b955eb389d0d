"""What `train.py fit` shows on a terminal: the step bar (one for the whole fit, its rate and time left true over
many epochs and after a resume, closed before Lightning's last line) and the model summary (layers, parameters).

The terminal is a real pseudo-terminal; `screen` replays what was written to it (carriage returns, newlines and
tqdm's cursor-up) into the lines a user sees at the end."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_makemore.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")

BATCH = 64  # the small corpus's ~2,700 training windows: ~42 steps an epoch, so a fit runs through many epochs


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """main(args) in this process sees only `args` (LightningCLI warns when pytest's own arguments are there)."""
    monkeypatch.setattr("sys.argv", ["train.py"])


# ---------------------------------------------------------------------------------------------------------
# the terminal


def run_in_terminal(args: list[str], cwd: Path, columns: int = 160) -> str:
    """Runs train.py with stdout and stderr on one pseudo-terminal `columns` wide; returns all it wrote."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": str(columns)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def screen(written: str) -> list[str]:
    """The lines a terminal shows after `written`: \\r returns to the line's start, \\n goes down a line, ESC[A up a
    line (tqdm's nested bars), other escape sequences (colours) change nothing; characters overwrite."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]", written):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token.startswith("\x1b"):
            continue
        else:
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


def test_screen_replays_carriage_returns_and_cursor_up():
    # a bar, a nested bar drawn below it then cleared, the bar's last state, the next line over the cleared one
    assert screen("a 10%\rb 20%\r\n\rval 1\x1b[A\r\n\r     \x1b[A\rb 99%\r\nnext") == ["b 99%", "next"]
    assert screen("\x1b[1mbold\x1b[0m\r\nx") == ["bold", "x"]


@pytest.fixture(scope="module")
def terminal(tmp_path_factory, small_corpus):
    """One fit of several epochs on a terminal, ending inside an epoch (at max_steps), as a user runs it."""
    tmp = tmp_path_factory.mktemp("terminal")
    steps = 300
    args = ["fit", "--data.path", str(small_corpus), "--data.batch_size", str(BATCH), "--monitors", "false"]
    written = run_in_terminal([*args, "--trainer.max_steps", str(steps)], tmp)
    return steps, written, screen(written)


def test_the_bar_ends_once_then_lightnings_last_line_stands_alone(terminal):
    steps, written, shown = terminal
    assert written.count("Training") > 5  # the bar was drawn all along, on the terminal
    bars = [line for line in shown if "Training" in line]
    assert len(bars) == 1, "\n".join(bars)  # one bar, not one an epoch, not printed a second time at the end
    assert re.search(rf"Training: 100%\|.*\| {steps}/{steps} \[", bars[0]), bars[0]
    after = [line for line in shown[shown.index(bars[0]) + 1 :] if line.strip()]
    assert after[0] == f"`Trainer.fit` stopped: `max_steps={steps}` reached.", after[:2]
    assert after[1] == "Done."


def test_model_summary_lists_the_networks_layers_and_parameters_only(terminal):
    _, written, shown = terminal
    start = next((i for i, line in enumerate(shown) if line.startswith("Layer")), None)
    assert start is not None, "\n".join(shown[:30])
    end = next(i for i in range(start, len(shown)) if shown[i].startswith("Total"))
    rows = [line.split() for line in shown[start : end + 1]]
    # the lecture's BatchNorm MLP on 27 characters, block size 3, by hand: C is 27x10, W1 30x200 (no bias: the
    # BatchNorm's beta replaces it), bngain and bnbias 200 each, W2 200x27 and b2 27: 12,097 parameters
    assert rows == [
        ["Layer", "Type", "Params"],
        ["net.embedding", "Embedding", "270"],
        ["net.blocks.0.linear", "Linear", "6,000"],
        ["net.blocks.0.bn", "BatchNorm1d", "400"],
        ["net.blocks.0.act", "Tanh", "0"],
        ["net.head", "Linear", "5,427"],
        ["Total", "12,097", "(all", "trainable,", "0.05", "MB)"],
    ]
    for noise in ("FLOPs", "MeanMetric", "val_loss", "test_loss", "Modules in"):
        assert noise not in written, noise


# ---------------------------------------------------------------------------------------------------------
# the bar's rate and time left, read as tqdm prints them


class BarProbe(Callback):
    """At each epoch's start: the training bar's line as tqdm prints it, its step count, and the time since the
    fit started by this callback's own clock (it runs before the bar: the user's callbacks come first)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float, str]] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.started, self.first_step = time.perf_counter(), trainer.global_step

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        bar = trainer.progress_bar_callback.train_progress_bar
        printed = bar.format_meter(**bar.format_dict)
        self.records.append((bar.n, time.perf_counter() - self.started, printed))


def _fit_with_probe(args: list[str]) -> tuple[BarProbe, int]:
    cli = main([*args, "--trainer.callbacks+=tests.test_console.BarProbe"])
    (probe,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, BarProbe)]
    return probe, cli.trainer.global_step


def _seconds(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def _check_rate_and_time_left(probe: BarProbe, max_steps: int) -> int:
    checked = 0
    for n, elapsed, printed in probe.records[2:]:  # from the third epoch on: the bar ran through epoch ends
        assert f" {n}/{max_steps} [" in printed, printed
        steps = n - probe.first_step  # the steps of this run (after a resume: since the resume)
        if steps < 100:
            continue
        meter = re.search(r" \[([\d:]+)<([\d:]+), *([\d.]+)it/s", printed)
        assert meter, printed
        rate = steps / elapsed  # by the probe's clock
        assert float(meter.group(3)) == pytest.approx(rate, rel=0.1), (printed, rate)
        left = (max_steps - n) / rate
        assert abs(_seconds(meter.group(2)) - left) <= 1 + 0.1 * left, (printed, left)
        assert abs(_seconds(meter.group(1)) - elapsed) <= 1 + 0.1 * elapsed, (printed, elapsed)
        checked += 1
    return checked


def test_bar_rate_and_time_left_are_steps_over_time_across_epochs_and_after_resume(tmp_path, small_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data.path", str(small_corpus), "--data.batch_size", str(BATCH), "--monitors", "false"]
    args += ["--trainer.enable_model_summary", "false"]
    probe, step = _fit_with_probe([*args, "--trainer.max_steps", "700"])
    assert step == 700 and len(probe.records) >= 15  # a fit of many epochs
    assert _check_rate_and_time_left(probe, 700) >= 8

    # resumed: the rate counts the steps since the resume over the time since the resume
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    probe, step = _fit_with_probe([*args, "--trainer.max_steps", "1100", "--ckpt_path", str(ckpt)])
    assert step == 1100 and probe.first_step == 700
    assert _check_rate_and_time_left(probe, 1100) >= 4
