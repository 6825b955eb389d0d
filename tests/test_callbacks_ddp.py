"""Multi-process and end-to-end checks: DDP on 2 CPU processes (gloo), a real TensorBoard server."""

import subprocess
import textwrap

import pytest

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import (
    TanhMLP,
    fixed_loader,
    get_json,
    histograms,
    read_events,
    run_two_process_script,
    saturating_batch,
    scalars,
    tensorboard_server,
    trainer,
)

DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lightning.pytorch as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.loggers import TensorBoardLogger
    from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

    class Net(L.LightningModule):
        def __init__(self, twist=True):
            super().__init__()
            self.twist = twist
            self.lin = nn.Linear(4, 6)
            self.act = nn.Tanh()
            self.rank0_only = nn.Sigmoid()  # called on rank 0 only: rank 1 must still join the collectives
            self.head = nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.act(self.lin(x))
            if self.twist and self.global_rank == 0:
                h = self.rank0_only(h)
            return nn.functional.cross_entropy(self.head(h), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def failing_write():
        # rank zero's writing fails at step 1 (a logger's disk or network): the other rank must not wait for it
        monitor = ActivationMonitor(every_n_steps=1)
        write = monitor.recorder._write  # (a monitor alone: its recorder writes)

        def failing(trainer, rec, readouts):
            if trainer.is_global_zero and rec.step == 1:
                raise OSError("writer broke on rank 0")
            return write(trainer, rec, readouts)

        monitor.recorder._write = failing
        return monitor

    if __name__ == "__main__":
        out = sys.argv[1]
        # rank r sees x = r + small: rank 0 values in [0, 0.1), rank 1 in [1, 1.1) before the Linear
        x = torch.cat([torch.rand(32, 4) * 0.1, 1 + torch.rand(32, 4) * 0.1])
        y = torch.randint(0, 2, (64,))
        loader = DataLoader(TensorDataset(x, y), batch_size=8)  # per rank; DistributedSampler splits
        monitors = [ActivationMonitor(every_n_steps=2, histogram_every_n_steps=2), GradientMonitor(every_n_steps=2),
                    ParameterMonitor(every_n_steps=2), UpdateRatioMonitor(every_n_steps=2)]
        net = Net()
        if sys.argv[2:] == ["fail_write"]:
            monitors = [failing_write()]
        if sys.argv[2:] == ["twin"]:  # the twin of a single process on the global batch (see the test)
            torch.manual_seed(0)
            x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
            loader = DataLoader(TensorDataset(x, y), batch_size=8)
            torch.manual_seed(1)
            net = Net(twist=False)
            monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1),
                        ParameterMonitor(every_n_steps=1)]
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, log_every_n_steps=2,
                            logger=TensorBoardLogger(out, name="ddp", version=0), callbacks=monitors,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            use_distributed_sampler=True)
        trainer.fit(net, loader)
    """
)


def _run_ddp(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_two_process_script(tmp_path, DDP_SCRIPT, *args)


@pytest.mark.slow
def test_ddp_two_cpu_processes_global_histograms(tmp_path):
    proc = _run_ddp(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = read_events(str(tmp_path / "ddp" / "version_0"))
    global_batch = 2 * 8  # 2 ranks x 8 rows
    for step, h in histograms(acc, "activation/act").items():
        assert h.num == global_batch * 6 == sum(h.bucket), step
    for step, h in histograms(acc, "activation_grad/act").items():
        assert h.num == global_batch * 6, step
    # the module called on rank 0 only: its count is rank 0's batch, and nobody deadlocked
    assert all(h.num == 8 * 6 for h in histograms(acc, "activation/rank0_only").values())
    assert sorted(scalars(acc, "activation/act/mean")) == [0, 1, 3]
    assert sorted(scalars(acc, "update_ratio/lin.weight")) == [0, 1, 3]
    assert sorted(scalars(acc, "param_grad/lin.weight/grad_to_data")) == [0, 1, 3]


@pytest.mark.slow
def test_ddp_statistics_are_those_of_one_process_on_the_global_batch(tmp_path):
    """Two ranks of 8 rows against one process on the same 16 rows a step: the activations, the gradients w.r.t.
    them (each rank back-propagates its own mean loss, which the monitor divides back) and the weights' gradients
    are the same numbers."""
    import lightning.pytorch as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    proc = _run_ddp(tmp_path, "twin")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_events(str(tmp_path / "ddp" / "version_0"))

    class Net(L.LightningModule):  # the script's Net without its rank-0 twist
        def __init__(self):
            super().__init__()
            self.lin, self.act, self.rank0_only, self.head = nn.Linear(4, 6), nn.Tanh(), nn.Sigmoid(), nn.Linear(6, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.act(self.lin(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    torch.manual_seed(1)
    net = Net()
    monitors = [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1), ParameterMonitor(every_n_steps=1)]
    t = trainer(tmp_path / "single", monitors, max_steps=4, log_every_n_steps=2)
    # Lightning's DistributedSampler shuffles the training set (seed 0) and gives rank r rows r, r + 2, ... of it:
    # the global batch of step s is rows 16 s .. 16 s + 15 of that permutation
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    t.fit(net, DataLoader(TensorDataset(x[perm], y[perm]), batch_size=16))
    single = read_events(t.logger.log_dir)
    for tag in ("activation/act/std", "activation_grad/act/std", "param_grad/lin.weight/std"):
        one, two = scalars(single, tag), scalars(ddp, tag)
        assert sorted(one) == sorted(two) == [0, 1, 2, 3], tag
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (tag, step)


def test_tensorboard_server_lists_the_tags(tmp_path):
    t = trainer(
        tmp_path,
        [
            ActivationMonitor(every_n_steps=1, histogram_every_n_steps=2),
            GradientMonitor(every_n_steps=1),
            ParameterMonitor(every_n_steps=1),
            UpdateRatioMonitor(every_n_steps=1),
        ],
        max_steps=4,
    )
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 4))
    run = "run/version_0"
    with tensorboard_server(tmp_path) as server:

        def all_tags() -> dict[str, dict] | None:
            kinds = ("scalars", "histograms", "images")
            tags = {kind: get_json(f"{server.url}/data/plugin/{kind}/tags") for kind in kinds}
            runs = {"scalars": run, "histograms": run, "images": f"{run}/figures"}  # the figures: a run of their own
            return tags if all(tags[kind].get(runs[kind]) for kind in kinds) else None

        tags = server.poll(all_tags, timeout=60)
        assert tags, "TensorBoard did not serve the run's scalars, histograms and images within 60 s"
        assert "activation/act/saturation" in tags["scalars"][run]
        assert "update_ratio/head.weight" in tags["scalars"][run]
        assert {"activation/act", "activation_grad/act", "param_grad/head.weight"} <= set(tags["histograms"][run])
        assert {"activation/distribution", "update_ratio/history"} <= set(tags["images"][f"{run}/figures"])


@pytest.mark.slow
def test_ddp_a_write_failing_on_rank_zero_stops_every_rank(tmp_path):
    """Rank zero alone writes: its error travels in the next logged step's all-reduce, and both ranks raise."""
    proc = _run_ddp(tmp_path, "fail_write")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "writer broke on rank 0" in output
    assert "MonitorRankError" in output and "failed on another rank" in output
