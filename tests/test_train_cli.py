"""train.py as a user runs it: subprocesses, TensorBoard event files, checkpoints, resume, predict, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT


def train(
    args: list[str], tmp_path: Path, names: Path | str | None, check: bool = True, **env_vars: str
) -> subprocess.CompletedProcess:
    """Runs train.py with $MAKEMORE_NAMES = `names` (None: unset) and any other environment variables given."""
    env = {k: v for k, v in os.environ.items() if k != "MAKEMORE_NAMES"} | {"PYTHONWARNINGS": "ignore", **env_vars}
    if names is not None:
        env["MAKEMORE_NAMES"] = str(names)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_corpus):
    """One 60-step fit shared by the tests below (monitors off: the callbacks have their own tests)."""
    tmp = tmp_path_factory.mktemp("fit")
    args = ["fit", "--trainer.max_steps", "60", "--trainer.log_every_n_steps", "10", "--monitors", "false", *QUIET]
    proc = train(args, tmp, small_corpus)
    return tmp, proc


def test_fit_writes_tensorboard_losses_checkpoints_and_samples(short_run):
    tmp, proc = short_run
    logdir = tmp / "lightning_logs" / "version_0"
    tags = scalars(logdir)
    # Lightning writes step metrics at steps n-1, 2n-1, ... for log_every_n_steps = n
    assert [s for s, _ in tags["train/loss"]] == [9, 19, 29, 39, 49, 59]
    assert all(1.5 < v < 3.5 for _, v in tags["train/loss"])
    ((step, val),) = tags["val/loss"]
    assert step == 60 - 1 and 2.0 < val < 3.3
    ckpts = {p.name for p in (logdir / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and any(n.startswith("step60-val") for n in ckpts)
    assert "20 names sampled from the trained model" in proc.stdout
    names = proc.stdout.split("trained model:\n", 1)[1].split()
    assert len(names) == 20 and all(n.isalpha() and n.islower() for n in names)
    assert (logdir / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("original", ["init check: 2 problems", "far above 3.30 = ln(27)", "is saturated at initialisation"]),
        ("batchnorm", ["init check: no problem found"]),
    ],
)
def test_fit_checks_the_init_and_writes_a_health_report(tmp_path, small_corpus, config, expected):
    """train.py's monitors by default: the init check when training starts, health.md at the end, its verdict."""
    args = ["fit", "--config", str(ROOT / "configs" / "lecture" / f"{config}.yaml"), "--trainer.max_steps", "20"]
    proc = train([*args, *QUIET], tmp_path, small_corpus)
    for line in expected:
        assert line in proc.stderr, proc.stderr[-2000:]
    report = (tmp_path / "lightning_logs" / "version_0" / "health.md").read_text()
    verdict = report.splitlines()[0].removeprefix("# Training health: ")
    assert f"health: {verdict} (lightning_logs/version_0/health.md)" in proc.stderr
    assert ("no problem found" in verdict) == (config == "batchnorm")


def test_tensorboard_has_the_lr_beside_the_loss_and_no_hp_metric(short_run, small_corpus):
    tmp, _ = short_run
    run = tmp / "lightning_logs" / "version_0"
    train(["test", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *QUIET], tmp, small_corpus)  # same run
    tags = scalars(run)
    # the lecture's step schedule over 60 steps: lr 0.1 for steps 0-29, 0.01 from step 0.5 x 60 = 30 on
    assert tags["train/lr"] == [(s, pytest.approx(0.1 if s < 30 else 0.01)) for s in (9, 19, 29, 39, 49, 59)]
    assert [s for s, _ in tags["train/lr"]] == [s for s, _ in tags["train/loss"]]  # on the loss's steps
    assert "test/loss" in tags and not [tag for tag in tags if "hp_metric" in tag]  # neither fit nor test wrote it


def test_resume_continues_from_the_saved_step(short_run, small_corpus):
    tmp, _ = short_run
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    args = ["fit", "--ckpt_path", str(ckpt), "--trainer.max_steps", "80", "--trainer.log_every_n_steps", "10"]
    train([*args, "--monitors", "false", *QUIET], tmp, small_corpus)
    steps = [s for s, _ in scalars(tmp / "lightning_logs" / "version_1")["train/loss"]]
    assert steps == [69, 79]  # continues after step 60; nothing re-trained from 0
    resumed = torch.load(tmp / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 80


@pytest.mark.parametrize(("max_steps", "where"), [(60, "already at"), (40, "past")])
def test_fit_from_a_finished_checkpoint_says_so_in_one_line_and_opens_no_run(short_run, small_corpus, max_steps, where):
    tmp, _ = short_run
    logs = tmp / "lightning_logs"
    runs = sorted(p.name for p in logs.iterdir())
    ckpt = "lightning_logs/version_0/checkpoints/last.ckpt"  # at step 60
    args = ["fit", "--ckpt_path", ckpt, "--trainer.max_steps", str(max_steps), "--monitors", "false"]
    proc = train(args, tmp, small_corpus)  # nothing is wrong: exit status 0
    assert proc.stdout.splitlines() == [
        f"Nothing to train: {ckpt} is at step 60, {where} --trainer.max_steps {max_steps}. Pass a larger "
        f"--trainer.max_steps to train on, `python train.py test --ckpt_path {ckpt}` to evaluate it, or "
        f"`python train.py predict --ckpt_path {ckpt}` to sample names."
    ]
    assert proc.stderr == ""
    assert sorted(p.name for p in logs.iterdir()) == runs  # no new lightning_logs/version_N


def test_predict_from_a_checkpoint_needs_no_data_file(short_run):
    tmp, _ = short_run
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    args = ["predict", "--ckpt_path", str(ckpt), "--data.num_samples", "7", *QUIET]
    proc = train(args, tmp, names="/nonexistent/names.txt")
    names = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(names) == 7 and all(n.isalpha() for n in names)


def test_predict_without_any_data_setting_does_not_download(short_run):
    """No --data.path, no $MAKEMORE_NAMES, an empty cache and no network: sampling still works."""
    tmp, _ = short_run
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    args = ["predict", "--ckpt_path", str(ckpt), "--data.num_samples", "3", *QUIET]
    proc = train(args, tmp, names=None, XDG_CACHE_HOME=str(tmp / "empty-cache"))
    assert len([line for line in proc.stdout.splitlines() if line.strip()]) == 3
    assert not (tmp / "empty-cache" / "lightning_makemore").exists()  # nothing downloaded


def test_validate_and_test_subcommands(short_run, small_corpus):
    tmp, _ = short_run
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    proc = train(["test", "--ckpt_path", str(ckpt), *QUIET], tmp, small_corpus)
    assert "test/loss" in proc.stdout


def test_help_explains_the_flags(tmp_path, small_corpus):
    out = train(["fit", "--help"], tmp_path, small_corpus).stdout
    for flag in ["--model.n_hidden", "--model.init", "--data.batch_size", "--data.path", "--monitors", "--threads"]:
        assert flag in out
    assert "naive" in out and "kaiming" in out  # the allowed init names are listed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model.n_hidden", "0"], "Expected n_hidden to be an integer >= 1, but got 0"),
        (["--data.block_size", "0"], "Expected block_size >= 1, but got 0"),
        (["--data.batch_size", "1"], "Expected --data.batch_size >= 2 with BatchNorm, but got 1"),
        (["--model.init", "xavier"], "model.init"),
        (["--data.path", "/nonexistent/names.txt"], "Names file not found: /nonexistent/names.txt"),
    ],
)
def test_bad_flags_fail_fast_with_one_clear_line(tmp_path, small_corpus, flags, message):
    proc = train(["fit", "--trainer.max_steps", "5", *flags, *QUIET], tmp_path, small_corpus, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.ckpt"))
