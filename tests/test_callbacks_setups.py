"""The monitors in the set-ups practitioners use: torch.compile, FSDP2, manual optimization, NaN location.

Each test reads back what was written and checks it against an independent computation: the same model
uncompiled, the full tensors saved by a separate callback, or the numbers computed by hand.
"""

import math
import subprocess
import textwrap
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from callbacks._compile import HAS_STANCE
from tests.callbacks_helpers import histograms, read_events, read_figures, run_two_process_script, scalars, trainer

IN, HIDDEN, CLASSES = 6, 12, 3


def _batches(n: int, batch_size: int = 16, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * batch_size, IN, generator=g), torch.randint(0, CLASSES, (n * batch_size,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    )


class Classifier(L.LightningModule):
    """A plain classifier around ``self.net``, compiled inside the module when ``compile_net``."""

    def __init__(self, compile_net: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = _net()
        self.net = torch.compile(net, backend="aot_eager") if compile_net else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _monitors() -> list[Callback]:
    return [
        ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4),
        GradientMonitor(every_n_steps=2, histogram_every_n_steps=4),
        ParameterMonitor(every_n_steps=2),
        UpdateRatioMonitor(every_n_steps=2),
    ]


def _fit_compiled(tmp_path, how: str, monitors: bool) -> tuple[dict[str, dict[int, float]], dict[str, Any], int]:
    """Fits 8 steps; returns the scalars, the histograms and the number of graphs dynamo compiled."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = Classifier(compile_net=how == "inner")
    if how == "whole":
        model = torch.compile(model, backend="aot_eager")
    t = trainer(tmp_path / f"{how}-{monitors}", _monitors() if monitors else [], max_steps=8, log_every_n_steps=2)
    t.fit(model, _batches(8))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    acc = read_events(t.logger.log_dir)
    tags = acc.Tags()
    return (
        {tag: scalars(acc, tag) for tag in tags["scalars"]},
        {tag: histograms(acc, tag) for tag in tags["histograms"]},
        graphs,
    )


@pytest.mark.skipif(not HAS_STANCE, reason="torch < 2.6: compiled modules' activations are not watched")
@pytest.mark.parametrize("how", ["inner", "whole"], ids=["net_compiled_in_module", "module_compiled_before_fit"])
def test_compiled_model_logs_what_the_uncompiled_twin_logs(tmp_path, how):
    eager_scalars, eager_hists, _ = _fit_compiled(tmp_path, "none", monitors=True)
    compiled_scalars, compiled_hists, graphs = _fit_compiled(tmp_path, how, monitors=True)
    _, _, graphs_alone = _fit_compiled(tmp_path, how, monitors=False)
    # the same tags (no `_orig_mod.`), activations and their gradients included, on the same steps
    assert compiled_scalars.keys() == eager_scalars.keys()
    assert {"activation/net.1/mean", "activation/net.3/dead", "activation_grad/net.1/std"} <= compiled_scalars.keys()
    for tag, values in eager_scalars.items():
        assert compiled_scalars[tag].keys() == values.keys() == {0, 1, 3, 5, 7}, tag
        for step, value in values.items():
            assert compiled_scalars[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (tag, step)
    assert compiled_hists.keys() == eager_hists.keys()
    for tag, hists in eager_hists.items():
        for step, h in hists.items():
            other = compiled_hists[tag][step]
            assert (other.num, other.min, other.max) == pytest.approx((h.num, h.min, h.max), rel=1e-5), (tag, step)
    # watching adds no compilation: the logged steps run eagerly and leave the compiled graph's guards valid
    assert graphs >= 1
    assert graphs == graphs_alone


class GAN(L.LightningModule):
    """Manual optimization with two optimizers, each stepped once a batch (``max_steps`` counts both)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, IN))
        self.discriminator = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 4, generator=torch.Generator().manual_seed(batch_idx))
        fake = self.generator(z)
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        loss_d = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = bce(self.discriminator(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log("train/loss_d", loss_d)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.05),
            torch.optim.Adam(self.discriminator.parameters(), lr=0.01),
        ]


class UpdateRecorder(Callback):
    """The update:data ratio of every 2-D parameter, from copies taken before each optimizer's step."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.ratios: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in pl_module.named_parameters():
            if id(p) in ids and p.ndim == 2:
                self.before[name] = p.detach().double().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        params = dict(pl_module.named_parameters())
        self.ratios[batch_idx] = {
            n: math.log10((params[n].detach().double() - b).std().item() / b.std().item())
            for n, b in self.before.items()
        }
        self.before = {}


def test_manual_optimization_two_optimizers_histograms_figures_and_every_update_ratio(tmp_path):
    recorder = UpdateRecorder()
    monitors = [
        ActivationMonitor(every_n_steps=2),
        GradientMonitor(every_n_steps=2),
        ParameterMonitor(every_n_steps=2),
        UpdateRatioMonitor(every_n_steps=2),
    ]
    t = trainer(tmp_path, [*monitors, recorder], max_steps=10, log_every_n_steps=2)
    t.fit(GAN(), _batches(20))
    assert t.global_step == 10  # 5 batches, two optimizer steps each
    acc = read_events(t.logger.log_dir)
    # scalars on the batch axis, the axis of `self.log`
    assert sorted(scalars(acc, "train/loss_d")) == [1, 3]
    assert sorted(scalars(acc, "activation/generator.1/mean")) == [0, 1, 3]
    # step 0 and the final step (batch 4) have the histograms and the figures, though max_steps counts both
    # optimizers
    assert sorted(histograms(acc, "activation/discriminator.1")) == [0, 4]
    assert sorted(histograms(acc, "param_grad/generator.0.weight")) == [0, 4]
    assert sorted(histograms(acc, "param_grad/discriminator.0.weight")) == [0, 4]
    assert {"activation/distribution", "activation_grad/distribution", "param_grad/distribution"} <= set(
        read_figures(t.logger.log_dir).Tags()["images"]
    )
    # every optimizer's parameters get their update ratio, equal to the one computed by hand
    for name in ("generator.0.weight", "generator.2.weight", "discriminator.0.weight", "discriminator.2.weight"):
        logged = scalars(acc, f"update_ratio/{name}")
        assert sorted(logged) == [0, 1, 3], name
        for step, value in logged.items():
            assert value == pytest.approx(recorder.ratios[step][name], abs=1e-4), (name, step)


class Poisoned(nn.Module):
    """Puts a NaN in its output from ``start`` on (a place in the middle of the network)."""

    def __init__(self) -> None:
        super().__init__()
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            x = x.clone()
            x[0, 0] = float("nan")
        return x


class NaNNet(L.LightningModule):
    """Declared out of forward order: ``late`` first, so the first *declared* module with NaN is not the source."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Tanh()
        self.early = nn.Sigmoid()
        self.poison = Poisoned()
        self.lin = nn.Linear(IN, IN)
        self.head = nn.Linear(IN, CLASSES)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.poison.on = self.global_step >= 2
        h = self.late(self.lin(self.poison(self.early(x))))  # forward order: early, poison, lin, late
        return nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # NaN gradients must not poison the weights


def test_nan_warning_names_the_first_module_in_forward_order_and_the_step(tmp_path):
    activation = ActivationMonitor(modules=[nn.Tanh, nn.Sigmoid, "poison", "lin"], every_n_steps=1)
    params = ParameterMonitor(every_n_steps=1, histogram_every_n_steps=1)
    t = trainer(tmp_path, [activation, params], max_steps=4)
    with pytest.warns(UserWarning) as record:
        t.fit(NaNNet(), _batches(4))
    messages = [str(w.message) for w in record if "non-finite" in str(w.message)]
    act = next(m for m in messages if m.startswith("ActivationMonitor"))
    assert "first at `poison (Poisoned)`" in act and "step 2, rank 0" in act, act
    par = next(m for m in messages if m.startswith("ParameterMonitor"))
    # backward reaches the head first, but the first parameter in the model's order is lin's weight
    assert "first in parameter order: `param_grad/lin.weight`" in par and "step 2, rank 0" in par, par
    acc = read_events(t.logger.log_dir)
    assert scalars(acc, "activation/poison/nonfinite") == {2: 1.0, 3: 1.0}


FSDP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lightning.pytorch as L
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy
    from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(24, 48)  # weight 48 x 24: 1,152 values, 24 x 24 on each rank
            self.act = nn.Tanh()
            self.head = nn.Linear(48, 2)

        def configure_model(self):
            for m in (self.lin, self.head):
                fully_shard(m, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.act(self.lin(x))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    class Saver(L.Callback):
        # the full tensors of the logged steps (odd steps), gathered by a callback that is not a monitor
        def __init__(self, out):
            self.out, self.saved = out, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step % 2 == 1:
                x, _ = batch
                self.saved[f"act/{trainer.global_step}/{trainer.global_rank}"] = torch.tanh(pl_module.lin(x)).detach()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step % 2 == 1:
                w = pl_module.lin.weight
                self.saved[f"w/{trainer.global_step}"] = w.full_tensor().detach().clone()
                self.saved[f"g/{trainer.global_step}"] = w.grad.full_tensor().detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (trainer.global_step - 1) % 2 == 1:  # after the optimizer step of a logged step
                self.saved[f"after/{trainer.global_step - 1}"] = pl_module.lin.weight.full_tensor().detach().clone()

        def on_train_end(self, trainer, pl_module):
            torch.save(self.saved, f"{self.out}/saved_{trainer.global_rank}.pt")

    class Failing(ActivationMonitor):
        # its probe raises on rank 1 only, inside a forward hook of step 1 (the other rank is fine)
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            on_output, rank = self.probe.on_output, trainer.global_rank

            def failing(rec, name, output):
                if rec.step == 1 and rank == 1:
                    raise ValueError("monitor broke on rank 1")
                return on_output(rec, name, output)

            self.probe.on_output = failing

    if __name__ == "__main__":
        out, mode = sys.argv[1], sys.argv[2]
        torch.manual_seed(0)
        x, y = torch.randn(64, 24), torch.randint(0, 2, (64,))
        loader = DataLoader(TensorDataset(x, y), batch_size=8)  # per rank; the distributed sampler splits
        monitors = [ActivationMonitor(every_n_steps=2, histogram_every_n_steps=2),
                    GradientMonitor(every_n_steps=2, histogram_every_n_steps=2),
                    ParameterMonitor(every_n_steps=2, histogram_every_n_steps=2), UpdateRatioMonitor(every_n_steps=2)]
        if mode == "fail":
            monitors = [Failing(every_n_steps=2)]
        trainer = L.Trainer(accelerator="cpu", devices=2,
                            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                            max_steps=4, log_every_n_steps=2, logger=TensorBoardLogger(out, name="fsdp", version=0),
                            callbacks=[*monitors, Saver(out)], enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(Net(), loader)
    """
)


needs_fsdp2 = pytest.mark.skipif(
    not hasattr(L.strategies, "ModelParallelStrategy"), reason="Lightning < 2.4 has no ModelParallelStrategy (FSDP2)"
)


def _run_fsdp(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return run_two_process_script(tmp_path, FSDP_SCRIPT, mode)


@pytest.mark.slow
@needs_fsdp2
def test_fsdp2_two_processes_statistics_of_the_full_tensors(tmp_path):
    proc = _run_fsdp(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = read_events(str(tmp_path / "fsdp" / "version_0"))
    saved = [torch.load(tmp_path / f"saved_{rank}.pt") for rank in (0, 1)]
    for step in (1, 3):
        w, g, after = saved[0][f"w/{step}"], saved[0][f"g/{step}"], saved[0][f"after/{step}"]
        for name, full in (("param/lin.weight", w), ("param_grad/lin.weight", g)):
            h = histograms(acc, name)[step]
            assert h.num == full.numel() == 48 * 24 == sum(h.bucket), (name, step)
            assert (h.min, h.max) == pytest.approx((full.min().item(), full.max().item()), rel=1e-6)
            assert h.sum == pytest.approx(full.double().sum().item(), rel=1e-5, abs=1e-8)
            assert h.sum_squares == pytest.approx(full.double().square().sum().item(), rel=1e-5)
        assert scalars(acc, "param_grad/lin.weight/std")[step] == pytest.approx(g.std().item(), rel=1e-4)
        assert scalars(acc, "param_grad/lin.weight/grad_to_data")[step] == pytest.approx(
            (g.std() / w.std()).item(), rel=1e-4
        )
        ratio = math.log10((after.double() - w.double()).std().item() / w.double().std().item())
        assert scalars(acc, "update_ratio/lin.weight")[step] == pytest.approx(ratio, abs=1e-4)
        # activations: the global batch, both ranks' halves
        act = torch.cat([saved[r][f"act/{step}/{r}"] for r in (0, 1)])
        h = histograms(acc, "activation/act")[step]
        assert h.num == 2 * 8 * 48 == act.numel()
        assert scalars(acc, "activation/act/mean")[step] == pytest.approx(act.mean().item(), rel=1e-4, abs=1e-6)
        assert scalars(acc, "activation/act/std")[step] == pytest.approx(act.std().item(), rel=1e-4)
        assert histograms(acc, "activation_grad/act")[step].num == 2 * 8 * 48


@pytest.mark.slow
@needs_fsdp2
def test_fsdp2_a_monitor_failing_on_one_rank_stops_every_rank(tmp_path):
    proc = _run_fsdp(tmp_path, "fail")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "monitor broke on rank 1" in output
    assert "MonitorRankError" in output and "failed on another rank" in output


def test_bf16_mixed_precision_statistics_of_the_16_bit_tensors(tmp_path):
    """Under ``precision="bf16-mixed"`` the activations are bfloat16: the statistics are theirs, in float64."""
    seen: dict[int, torch.Tensor] = {}

    class Reference(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            def keep(module, args, output) -> None:
                seen[trainer.global_step] = output.detach().clone()

            pl_module.net[1].register_forward_hook(keep)

    t = trainer(tmp_path, [*_monitors(), Reference()], max_steps=4, precision="bf16-mixed", log_every_n_steps=2)
    t.fit(Classifier(), _batches(4))
    acc = read_events(t.logger.log_dir)
    for step in (1, 3):
        ref = seen[step]
        assert ref.dtype == torch.bfloat16
        assert scalars(acc, "activation/net.1/mean")[step] == pytest.approx(ref.double().mean().item(), abs=1e-6)
        assert scalars(acc, "activation/net.1/std")[step] == pytest.approx(ref.double().std().item(), rel=1e-5)
        assert math.isfinite(scalars(acc, "activation_grad/net.1/std")[step])
        assert math.isfinite(scalars(acc, "update_ratio/net.0.weight")[step])
    assert histograms(acc, "activation/net.1")[3].num == 16 * HIDDEN


def test_compiled_model_on_a_torch_without_set_stance_warns_once(tmp_path, monkeypatch):
    from callbacks import _compile

    monkeypatch.setattr(_compile, "HAS_STANCE", False)  # what torch < 2.6 lacks
    torch._dynamo.reset()
    t = trainer(tmp_path, [ActivationMonitor(every_n_steps=1), ParameterMonitor(every_n_steps=1)], max_steps=2)
    with pytest.warns(UserWarning, match=r"set_stance.*may not be\s+watched") as record:
        t.fit(Classifier(compile_net=True), _batches(2))
    assert sum("set_stance" in str(w.message) for w in record) == 1
    assert "param_grad/net.0.weight/std" in read_events(t.logger.log_dir).Tags()["scalars"]  # read outside the graph
