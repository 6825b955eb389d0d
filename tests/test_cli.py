"""The CLI a newcomer meets: one-line errors, a readable --help, a quiet console, the end-of-fit summary, Trainer
flags that work or say why, and no empty run folders from predict/test. Real commands on a corpus the tests write."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_makemore.cli import main
from lightning_makemore.data import NamesDataModule
from lightning_makemore.module import MakemoreModule
from tests.callbacks_helpers import free_port, get_json
from tests.conftest import ROOT
from tests.test_train_cli import QUIET, scalars, train

STEPS = 90


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    """main(args) in this process sees only `args` (LightningCLI warns when pytest's own arguments are there)."""
    monkeypatch.setattr("sys.argv", ["train.py"])


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory, small_corpus):
    """One `train.py fit` as a user types it (progress bar on, monitors off: they have their own tests)."""
    tmp = tmp_path_factory.mktemp("fit")
    args = ["fit", "--data.path", str(small_corpus), "--trainer.max_steps", str(STEPS), "--monitors", "false"]
    proc = train([*args, "--trainer.log_every_n_steps", "10"], tmp, names=None, PYTHONWARNINGS="default")
    return tmp, proc


def _errors(capsys, args: list[str]) -> tuple[list[str], str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.strip()], err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--model.n_hiden", "10"], "unknown flag --model.n_hiden: did you mean `--model.n_hidden`?"),
        (
            ["fit", "--model.init", "kaimin"],
            "--model.init kaimin is not allowed (did you mean `kaiming`?): expected one of pytorch, naive, "
            "tanh_fix, kaiming.",
        ),
        (["fit", "--model.init", "foo"], "expected one of pytorch, naive, tanh_fix, kaiming."),
        (["fit", "--data.sampling", "shufle"], "(did you mean `shuffle`?): expected one of random, shuffle."),
        (["fit", "--optimizer", "AdamW"], "pass --model.optimizer adamw (or sgd)"),
        (["fit", "--trainer.max_steps", "x"], "--trainer.max_steps x is not allowed: expected int."),
    ],
)
def test_argument_errors_are_one_line_then_a_pointer_to_help(capsys, args, expected):
    lines, err = _errors(capsys, args)
    assert len(lines) == 2, err  # no usage dump
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert lines[1] == "Run `python train.py fit --help` for every flag."


def test_help_describes_every_model_and_data_flag_before_the_trainers(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    options = out.split("\noptions:", 1)[1]
    flags = re.findall(r"^  (--(?:model|data)\.\w+)(.*)\n(.*)", options, re.MULTILINE)
    assert {f for f, _, _ in flags} >= {"--model.n_hidden", "--model.init", "--data.batch_size", "--data.path"}
    assert len(flags) >= 30
    for flag, same_line, next_line in flags:
        text = same_line.split(None, 1)[1] if len(same_line.split(None, 1)) > 1 else next_line.strip()
        assert not text.startswith("(type:"), f"{flag} has no description"
    assert options.index("--model.n_hidden") < options.index("--data.path") < options.index("--trainer.max_steps")


def test_top_level_help_lists_examples_one_per_line_with_files_that_exist(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = [line.strip() for line in out.splitlines() if line.strip().startswith("python train.py")]
    assert len(examples) >= 4 and all(line.count("python train.py") == 1 for line in examples)
    configs = re.findall(r"--config (configs/\S+)", out)
    assert configs and all((ROOT / c).is_file() for c in configs)


def test_fit_ends_with_a_summary_of_exact_losses_steps_paths_and_names(fit_run):
    tmp, proc = fit_run
    out = proc.stdout
    run = tmp / "lightning_logs" / "version_0"
    loss = re.search(r"loss\s+train (\d\.\d{4}), val (\d\.\d{4})", out)
    assert loss, out[-2000:]
    # independent check: the checkpoint's weights over the whole splits, plain PyTorch
    model = MakemoreModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = NamesDataModule(path=str(_corpus(run)))
    dm.setup("fit")
    model.net.eval()
    with torch.no_grad():
        expected = [F.cross_entropy(model.net(X), Y).item() for X, Y in (dm.splits["train"], dm.splits["val"])]
    assert [float(loss.group(1)), float(loss.group(2))] == pytest.approx(expected, abs=6e-5)
    assert scalars(run)["val/loss"][-1][1] == pytest.approx(float(loss.group(2)), abs=6e-5)
    assert re.search(rf"steps\s+{STEPS} of {STEPS} in \d+\.\d s", out)
    assert "checkpoints lightning_logs/version_0/checkpoints" in out and "logs        lightning_logs/version_0" in out
    assert re.search(r"TensorBoard \S*tensorboard --logdir lightning_logs", out)
    names = out.split("names sampled from the trained model:\n", 1)[1].split()
    assert len(names) == 20
    # the bar counts steps of max_steps, not epochs without an end
    assert f"{STEPS}/{STEPS}" in proc.stdout and "Training" in proc.stdout and "Epoch" not in proc.stdout


def _corpus(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]


NOISE = ["No seed found", "Seed set to", "litlogger", "litmodels", "LeafSpec", "Be aware that when using `ckpt_path`"]
NOISE += ["DeprecationWarning", "Traceback"]


def test_console_shows_only_what_is_ours_to_say(fit_run):
    tmp, proc = fit_run
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, noise
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for sub in (["predict", "--data.num_samples", "3"], ["test", "--data.path", _corpus(ckpt.parent.parent)]):
        out = train([*sub, "--ckpt_path", str(ckpt)], tmp, names=None, PYTHONWARNINGS="default")
        for noise in NOISE:
            assert noise not in out.stdout + out.stderr, (sub[0], noise)


def test_predict_and_test_create_no_empty_run_folders(fit_run):
    tmp, _ = fit_run
    logs = tmp / "lightning_logs"
    ckpt = logs / "version_0" / "checkpoints" / "last.ckpt"
    before = len(scalars(logs / "version_0").get("test/loss", []))
    train(["predict", "--ckpt_path", str(ckpt), "--data.num_samples", "2", *QUIET], tmp, names=None)
    train(["test", "--ckpt_path", str(ckpt), "--data.path", _corpus(logs / "version_0"), *QUIET], tmp, names=None)
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    assert len(scalars(logs / "version_0")["test/loss"]) == before + 1  # test/loss written into the trained run
    assert not (tmp / "config.yaml").exists()


def test_enable_checkpointing_false_trains_without_checkpoints(tmp_path, small_corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data.path", str(small_corpus), "--trainer.max_steps", "8", "--monitors", "false", *QUIET]
    cli = main([*args, "--trainer.enable_checkpointing", "false"])
    assert cli.trainer.global_step == 8 and cli.trainer.checkpoint_callback is None
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_logger_the_user_chooses_is_kept(tmp_path, small_corpus, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data.path", str(small_corpus), "--trainer.max_steps", "20", "--monitors", "false", *QUIET]
    cli = main([*args, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", "csv"])
    assert [type(logger) for logger in cli.trainer.loggers] == [CSVLogger]
    assert (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").is_file()
    assert not list(tmp_path.rglob("events.out.tfevents*"))  # no TensorBoard logger added beside it


@pytest.mark.parametrize(
    ("flags", "outcome"),
    [
        (["--trainer.logger", "false"], "ok"),
        (["--trainer.barebones", "true"], "ok"),
        (["--trainer.fast_dev_run", "true"], "ok"),
        (["--trainer.max_steps", "-1"], "error: Expected --trainer.max_steps > 0"),
    ],
    ids=["no_logger", "barebones", "fast_dev_run", "endless"],
)
def test_trainer_flags_work_or_fail_with_our_one_line_reason(
    tmp_path, small_corpus, monkeypatch, capsys, flags, outcome
):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--data.path", str(small_corpus), "--trainer.max_steps", "6", "--monitors", "false", *flags]
    if outcome == "ok":
        cli = main(args)
        assert cli.trainer.global_step > 0
        assert "names sampled from the trained model" in capsys.readouterr().out
    else:
        lines, err = _errors(capsys, args)
        assert lines[0].startswith(outcome) and len(lines) == 1, err


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_tensorboard_prints_the_custom_scalars_url_on_the_given_port_then_serves_it():
    tensorboard = Path(sys.prefix) / "bin" / "tensorboard"
    if not tensorboard.is_file():
        pytest.skip(f"no {tensorboard}")
    port = free_port()
    # this environment's venv, taken as installed (-o: never `make setup` from a test)
    command = ["make", "-s", "-C", str(ROOT), f"VENV={sys.prefix}", "-o", f"{sys.prefix}/.installed", "tensorboard"]
    proc = subprocess.Popen(
        [*command, f"ARGS=--port {port} --host 127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # make, its shell and tensorboard: stopped together below
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # a Makefile that prints nothing fails, not hangs
        first = proc.stdout.readline().strip() if ready else "(nothing printed)"
        assert first == f"Training-health dashboard (Custom Scalars): http://127.0.0.1:{port}/#custom_scalars"
        deadline, plugins = time.monotonic() + 60, None
        while plugins is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                plugins = get_json(f"http://127.0.0.1:{port}/data/plugins_listing")
            except OSError:
                time.sleep(0.5)
        assert plugins is not None and "custom_scalars" in plugins  # served where the line says
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        proc.stdout.close()
