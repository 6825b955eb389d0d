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
