"""The training loss, and the loss a uniform guess would have: the first number the lecture looks at.

At initialisation a classifier should be unsure: its loss near ``ln(C)`` for ``C`` classes (3.30 for the 27
characters of the names), not far above it (27.9 with the lecture's naive init: the "hockey stick"). The probe
reads the loss each recorded step from what ``training_step`` returned (a tensor, or ``{"loss": tensor}``), the
mean over micro-batches and ranks, and says what ``C`` is: given, or the ``out_features`` of the model's last
``nn.Linear`` (the output layer of a classifier or language model). It writes nothing of its own (the model logs
its loss); the judges read it, and it fills the ``loss`` column of the every-step trace.

This is the smallest probe: read one tensor per step, say what it means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from callbacks._cadence import Cadence, Moment
from callbacks._stats import Summary
from callbacks.probes.base import Probe, Recording

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class Loss:
    prefix: ClassVar[str] = "loss"  # its probe's: a judge reads it as `readouts[Loss]`
    step: int
    value: float  # the mean training loss of the step (NaN when training_step returned no loss)
    classes: int | None  # C of the uniform guess ln(C); None: unknown (no output layer, or switched off)
    source: str  # where C comes from: "given", or "`head` (Linear, out_features=27)"


def output_layer(model: nn.Module) -> tuple[str, int] | None:
    """``(name, out_features)`` of the last ``nn.Linear`` registered in ``model`` (its output layer, usually)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module.out_features)
    return last


def loss_of(outputs: Any) -> Tensor | None:
    """The loss ``training_step`` returned: a tensor, or ``outputs["loss"]``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), Tensor):
        return outputs["loss"]
    return None


class LossProbe(Probe):
    """Watches the training loss; ``num_classes``: ``C`` of the uniform guess (None: inferred, 0: none)."""

    prefix = "loss"
    has_histograms = False

    def __init__(self, cadence: Cadence, num_classes: int | None = None) -> None:
        super().__init__(cadence)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise ValueError(f"Expected `num_classes` to be None or an int >= 0, but got {num_classes!r}.")
        if num_classes is not None and num_classes < 0:
            raise ValueError(f"Expected `num_classes` to be None or an int >= 0, but got {num_classes!r}.")
        self.num_classes = num_classes
        # the step's mean loss over micro-batches and ranks: a sum and a count, both summed (NaN/inf left out)
        self.add_state("loss_sum", "sum")
        self.add_state("loss_count", "sum")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.classes: int | None = None
        self.source = ""

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.num_classes is not None:
            self.classes, self.source = (self.num_classes or None), "given"
            return
        found = output_layer(pl_module)
        if found is not None and found[1] >= 2:
            self.classes, self.source = found[1], f"`{found[0]}` (Linear, out_features={found[1]})"

    def end_step(self, rec: Recording, outputs: Any) -> None:
        loss = loss_of(outputs)
        if loss is None:
            return
        if self in rec.moments:
            value = loss.detach().to(torch.float64)
            finite = torch.isfinite(value)
            self.loss_sum += value.where(finite, 0.0).sum()
            self.loss_count += finite.sum()
        if rec.tracing:
            rec.trace("loss", loss.detach())

    def trace_columns(self) -> list[str]:
        return ["loss"]

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Loss:
        n = self.loss_count.item()
        return Loss(step, self.loss_sum.item() / n if n > 0 else math.nan, self.classes, self.source)
