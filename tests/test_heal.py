"""train.py heal and the rerun command: real fits on the small corpus, as a user runs them."""

from __future__ import annotations

import re
import shlex

import pytest

from callbacks.judges.base import Action
from lightning_makemore.heal import flags_for, format_fix, parse_fix
from tests.conftest import ROOT
from tests.test_train_cli import QUIET, train

ORIGINAL = ["--config", str(ROOT / "configs" / "lecture" / "original.yaml")]
SHORT = ["--trainer.max_steps", "300", "--trainer.log_every_n_steps", "10", "--trainer.enable_checkpointing", "false"]


@pytest.fixture(scope="module")
def sick(tmp_path_factory, small_corpus):
    """`train.py heal` on the lecture's naive init (over-confident output, saturated tanh), 300 steps."""
    tmp = tmp_path_factory.mktemp("heal")
    proc = train(["heal", *ORIGINAL, *SHORT, *QUIET], tmp, small_corpus)
    return tmp, proc


def _printed_vals(stdout: str) -> list[float]:
    """The val loss each fit's own summary printed, in order."""
    return [float(v) for v in re.findall(r"loss +train [\d.]+, val ([\d.]+)", stdout)]


def test_heal_keeps_the_fixes_that_lower_the_val_loss(sick):
    tmp, proc = sick
    report = (tmp / "lightning_logs" / "version_0" / "heal.md").read_text()
    rows = [line.split(" | ") for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r[0].strip("| ") for r in rows][:2] == ["0", "1"]
    vals = [float(r[3]) for r in rows]
    assert vals == pytest.approx(_printed_vals(proc.stdout), abs=1e-4)  # the table's vals are the fits' own
    # round 1: all the fixes together, then each alone; the best of them is kept (3.x -> 2.x), the rest say why not
    first = [(r, v) for r, v in zip(rows, vals, strict=True) if r[0].strip("| ") == "1"]
    assert rows[0][4] == "start" and "init kaiming" in first[0][0][1] and "scale net.head × 0.01" in first[0][0][1]
    assert len(first) == 4  # together, and the three fixes alone
    (best,) = [v for r, v in first if r[4] == "kept"]
    assert best == min(v for _, v in first) and best < vals[0] - 0.3
    for r, v in first:
        if r[4] != "kept":
            assert r[4] == (
                "better, not the best" if v < vals[0] - 0.024 else "worse" if v > vals[0] + 0.024 else "no better"
            )
    kept = [r[5].strip(" |") for r in rows if r[4] in ("start", "kept")][-1]
    assert f"kept run: {kept}" in proc.stdout and f"Kept run: `{kept}`" in report
    # the kept run's command carries the flags of what its row changed
    (changed,) = [r[1] for r, _ in first if r[4] == "kept"]
    command = proc.stdout.split("kept run:")[1].splitlines()[1]
    for phrase, flag in [("init kaiming", "--model.init kaiming"), ("scale net.head", "--model.last_layer_scale 0.01")]:
        assert (flag in command) == (phrase in changed)
    assert all(r[4] != "kept" or float(r[3]) < vals[0] for r in rows)  # never kept worse than the start


def test_heal_does_not_retrain_on_the_update_ratio_alone(tmp_path, small_corpus):
    # BatchNorm at SGD lr 3: the update ratio says too high (a note), the calibrated advice finds the loss
    # plateaued, not rising (a note): no problem, so nothing is retrained on the ratio's word alone
    config = ["--config", str(ROOT / "configs" / "lecture" / "batchnorm.yaml"), "--model.lr", "3"]
    proc = train(["heal", *config, *SHORT, *QUIET], tmp_path, small_corpus)
    assert "The run is healthy: nothing to fix." in proc.stdout
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    health = (tmp_path / "lightning_logs" / "version_0" / "health.md").read_text()
    assert "updates are large" in health and "weighs it against the loss" in health  # the note, with why
    assert "nothing to fix" in (tmp_path / "lightning_logs" / "version_0" / "heal.md").read_text()


def test_the_reports_rerun_command_parses_as_train_py_flags(sick, small_corpus):
    tmp, _ = sick
    health = (tmp / "lightning_logs" / "version_0" / "health.md").read_text()
    (command,) = re.findall(r"```bash\n(python train\.py fit .*)\n```", health)
    args = shlex.split(command)[2:]
    assert args[:3] == ["fit", "--config", "lightning_logs/version_0/config.yaml"]
    proc = train([*args, "--print_config"], tmp, small_corpus)  # jsonargparse parses every flag, then prints
    assert "init: kaiming" in proc.stdout and "last_layer_scale: 0.01" in proc.stdout
    assert "init: naive" not in proc.stdout


def test_heal_on_a_healthy_run_says_so_and_fits_once(tmp_path, small_corpus):
    config = ["--config", str(ROOT / "configs" / "lecture" / "batchnorm.yaml")]
    proc = train(["heal", *config, *SHORT, *QUIET], tmp_path, small_corpus)
    assert "The run is healthy: nothing to fix." in proc.stdout
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert "nothing to fix" in (tmp_path / "lightning_logs" / "version_0" / "heal.md").read_text()


def test_flags_for_each_action_and_fix_strings():
    model = {"lr": 0.1, "init": "naive", "last_layer_scale": None, "batchnorm": False}
    actions = [
        Action("scale_lr", (), 0.1),
        Action("scale_layer", ("net.head",), 0.01),
        Action("init", ("net.blocks.0.act",), "kaiming"),
        Action("normalise"),
        Action("activation", (), "relu"),
        Action("clip_gradients", (), 1.0),
        Action("scale_lr", ("net.embedding.weight",), 0.5),
    ]
    flags, skipped = flags_for(actions, model, {}, fix="scale_layer:net.blocks.0.linear:0.5")
    assert flags == [
        *("--model.last_layer_scale", "0.01", "--model.init", "kaiming", "--model.batchnorm", "true"),
        *("--model.activation", "relu", "--trainer.gradient_clip_val", "1", "--model.lr", "0.01"),
        *("--fix", "scale_layer:net.blocks.0.linear:0.5 scale_lr:net.embedding.weight:0.5"),  # the run's own kept
    ]
    assert skipped == []
    done = {"lr": 0.1, "init": "kaiming", "last_layer_scale": 0.01, "batchnorm": True}
    assert flags_for(actions[1:4], done, {}) == ([], ["scale net.head × 0.01 (the output layer is already scaled)",
                                                      "init kaiming before net.blocks.0.act (already kaiming)",
                                                      "normalise (BatchNorm) (already on)"])  # fmt: skip
    assert parse_fix(format_fix(actions[-1])) == actions[-1]
    # a softmax before the loss is an edit of the code: no flag, said as such
    logits = Action("loss_logits", ("cross_entropy",))
    assert flags_for([logits], model, {}) == (
        [],
        ["logits to cross_entropy (no softmax before it) (an edit of the model's code, not a flag)"],
    )
    with pytest.raises(ValueError, match="Expected --fix KIND:TARGETS:VALUE"):
        parse_fix("scale_lr:0.1")
    # too few examples per step: the data module's batch size, unless it is already that large
    batch = Action("batch_size", (), 32)
    assert flags_for([batch], model, {}, data={"batch_size": 2}) == (["--data.batch_size", "32"], [])
    assert flags_for([batch], model, {}, data={"batch_size": 64}) == ([], ["batch size 32 (already 64)"])


def test_a_bad_fix_flag_fails_in_one_line(tmp_path, small_corpus):
    proc = train(["fit", "--fix", "shrink:net.head:2", *SHORT, *QUIET], tmp_path, small_corpus, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: Expected --fix KIND:TARGETS:VALUE")


def test_ctrl_c_during_a_round_keeps_the_finished_rounds_and_exits_130(tmp_path, small_corpus):
    """Ctrl-C (SIGINT) once the first retrain has started: heal.md lists the run as given and says where it
    stopped, nothing half-written is left, no traceback, exit status 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MAKEMORE_NAMES": str(small_corpus)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "heal", *ORIGINAL, *SHORT, *QUIET],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = tmp_path / "lightning_logs" / "version_1"  # the first retrain's folder
    deadline = time.monotonic() + 240
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "heal ended before its first retrain: nothing to interrupt"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    report = (tmp_path / "lightning_logs" / "version_0" / "heal.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 1 and "| start |" in rows[0]  # the run as given, finished before Ctrl-C
    assert "Interrupted during round 1: the rounds above finished and are kept as they were." in report
    assert "Interrupted during round 1" in out and "Traceback" not in err
    assert not list(tmp_path.rglob("*.md.tmp"))  # nothing half-written
