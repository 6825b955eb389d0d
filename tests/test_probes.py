"""A probe and a judge of one's own on the recorder: the loss probe (the smallest probe) read by a judge that keeps
what it is given, against the losses computed by a reference callback."""

import math
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback
from torch import nn

from callbacks._cadence import Cadence
from callbacks._recorder import Part, Recorder
from callbacks.judges.base import Judge
from callbacks.probes.loss import LossProbe
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer


class Keep(Judge):
    """A judge that finds nothing and keeps every loss readout it is given."""

    reads = ("loss",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, Any] = {}

    def observe(self, step: int, readouts: Any) -> list:
        self.seen[step] = readouts["loss"]
        return []


@pytest.mark.parametrize("num_classes", [None, 5, 0])
def test_the_loss_probe_reads_the_steps_mean_loss_and_says_what_c_is(tmp_path, num_classes):
    keep = Keep()
    probe = LossProbe(Cadence(every_n_steps=2), num_classes=num_classes)
    recorder = Recorder([Part("LossProbe", [probe], [keep])])
    losses: dict[int, list[float]] = {}

    class Reference(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.setdefault(batch_idx // 2, []).append(outputs["loss"].item())  # 2 micro-batches a step

    t = trainer(tmp_path, [recorder, Reference()], max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 8))
    assert sorted(keep.seen) == [0, 1, 3]  # step 0, then every 2 steps
    for step, loss in keep.seen.items():
        assert loss.value == pytest.approx(sum(losses[step]) / 2, rel=1e-6)  # the mean of the micro-batches
    loss = keep.seen[0]
    if num_classes is None:  # TanhMLP's last Linear is `head`, 3 classes
        assert (loss.classes, loss.source) == (3, "`head` (Linear, out_features=3)")
    else:
        assert (loss.classes, loss.source) == ((num_classes or None), "given")
    assert math.isfinite(loss.value)


def test_a_model_without_a_linear_has_no_uniform_guess(tmp_path):
    class NoLinear(TanhMLP):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Bilinear(16, 16, 3)  # no nn.Linear at the end: nothing to infer C from
            self.hidden = nn.Identity()

        def forward(self, x):
            h = self.act(x)
            return self.head(h.repeat(1, 2), h.repeat(1, 2))

    keep = Keep()
    recorder = Recorder([Part("LossProbe", [LossProbe(Cadence(every_n_steps=1))], [keep])])
    trainer(tmp_path, [recorder], max_steps=1).fit(NoLinear(), fixed_loader(saturating_batch(), 1))
    assert keep.seen[0].classes is None and keep.seen[0].source == ""


class KeepTrace(Judge):
    """Keeps every trace row it is given (the rows since the last read, on recorded steps and at the end)."""

    reads = ("trace",)

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def observe(self, step: int, readouts: Any) -> list:
        trace = readouts["trace"]
        for s, row in zip(trace.steps, trace.rows, strict=True):
            self.rows[s] = dict(zip(trace.columns, row, strict=True))
        return []

    def conclude(self, step: int, readouts: Any) -> list:
        return self.observe(step, readouts)


def test_the_every_step_trace_against_the_tensors(tmp_path):
    """Every step's row: the loss, each watched output's RMS, each weight's gradient norm and sampled update:data
    ratio, equal to what a reference callback computes from the tensors (the update ratio within its sampling)."""
    import torch

    from callbacks._cadence import Cadence as C
    from callbacks.probes.activation import ActivationProbe
    from callbacks.probes.parameter import ParameterProbe
    from callbacks.probes.update import SAMPLE, UpdateProbe

    probes = [
        LossProbe(C(every_n_steps=5)),
        ActivationProbe(None, C(every_n_steps=5), 16, 0.97),
        ParameterProbe(None, 2, C(every_n_steps=5), 16),
        UpdateProbe(None, 2, C(every_n_steps=5)),
    ]
    keep = KeepTrace()
    recorder = Recorder([Part("all", probes, [keep])], trace=True)
    ref: dict[int, dict[str, float]] = {}

    class Reference(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            row = ref.setdefault(trainer.global_step, {})
            row["act/act"] = pl_module.h.detach().square().mean().sqrt().item()
            for name, p in pl_module.named_parameters():
                if p.ndim == 2:
                    row[f"grad/{name}"] = p.grad.norm().item()
                    row[f"before/{name}"] = p.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            row = ref[batch_idx]
            row["loss"] = outputs["loss"].item()
            for name, p in pl_module.named_parameters():
                if p.ndim == 2:
                    before = row.pop(f"before/{name}").flatten()
                    # the probe's fixed sample: SAMPLE indices from a generator seeded by the name's characters
                    g = torch.Generator().manual_seed(sum(map(ord, name)))
                    idx = torch.randint(0, before.numel(), (SAMPLE,), generator=g)
                    after = p.detach().flatten()[idx]
                    row[f"upd/{name}"] = torch.log10((after - before[idx]).norm() / before[idx].norm()).item()

    t = trainer(tmp_path, [recorder, Reference()], max_steps=12, log_every_n_steps=5)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 12))
    assert sorted(keep.rows) == list(range(12))  # every step, read on the recorded steps and at the end
    for step, row in keep.rows.items():
        expected = ref[step]
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert row["act/act"] == pytest.approx(expected["act/act"], rel=1e-5)
        for name in ("hidden.weight", "head.weight"):
            assert row[f"grad/{name}"] == pytest.approx(expected[f"grad/{name}"], rel=1e-5)
            assert row[f"upd/{name}"] == pytest.approx(expected[f"upd/{name}"], rel=1e-4)  # the same 64 elements
        assert math.isfinite(row["act/relu"])
