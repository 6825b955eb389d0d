"""DDP on 2 CPU processes (gloo) through train.py: exact val loss, global histograms, rank-zero output."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_makemore import MakemoreModule, NamesDataModule, split_loss
from tests.test_train_cli import QUIET, train

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("ddp")
    # momentum 0.5 makes any drift of BatchNorm running statistics between the ranks visible in the val loss
    args = ["fit", *DDP, "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "10", "--model.bn_momentum", "0.5"]
    proc = train([*args, "--data.eval_batch_size", "100", *QUIET], tmp, small_corpus)
    return tmp, proc


@pytest.mark.slow
def test_ddp_val_loss_equals_a_single_process_evaluation_of_the_checkpoint(ddp_run, small_corpus):
    tmp, _ = ddp_run
    logdir = tmp / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    ddp_val = acc.Scalars("val/loss")[-1].value
    model = MakemoreModule.load_from_checkpoint(logdir / "checkpoints" / "last.ckpt", map_location="cpu")
    dm = NamesDataModule(path=str(small_corpus))
    dm.setup("validate")
    single = split_loss(model.net, *dm.splits["val"])
    # one duplicated or dropped example of the ~300 would move the mean by ~1e-3; float32 noise is below 2e-6
    assert ddp_val == pytest.approx(single, abs=5e-6)
    assert torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 40


@pytest.mark.slow
def test_ddp_histograms_are_global_and_rank_zero_writes_once(ddp_run):
    tmp, proc = ddp_run
    logdir = tmp / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    acc.Reload()
    hist = acc.Histograms("activation/net.blocks.0.act")[-1]
    assert hist.histogram_value.num == 2 * 32 * 200  # both ranks' batches of 32, 200 tanh units each
    assert [p.name for p in (tmp / "lightning_logs").iterdir()] == ["version_0"]  # one writer
    assert proc.stdout.count("names sampled from the trained model") == 1  # sampling on rank zero only


@pytest.mark.slow
def test_ddp_predict_prints_once(ddp_run):
    tmp, _ = ddp_run
    ckpt = tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    proc = train(["predict", *DDP, "--ckpt_path", str(ckpt), "--data.num_samples", "5", *QUIET], tmp, "/nonexistent")
    names = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(names) == 5, proc.stdout


def test_sync_batchnorm_on_cpu_is_a_clear_error(tmp_path, small_corpus):
    args = ["fit", "--trainer.accelerator", "cpu", "--trainer.sync_batchnorm", "true", "--trainer.max_steps", "5"]
    args += QUIET
    proc = train(args, tmp_path, small_corpus, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --trainer.sync_batchnorm true needs CUDA GPUs" in proc.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path, small_corpus):
    proc = train(["predict", "--ckpt_path", "nope.ckpt", *QUIET], tmp_path, small_corpus, check=False)
    assert proc.returncode == 2 and "error: Checkpoint not found: nope.ckpt" in proc.stderr
