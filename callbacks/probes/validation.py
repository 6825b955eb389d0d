"""The validation loss a LightningModule logs, read after each validation run (for the judges at the end of fit).

It records nothing on training steps: after each validation run (not the sanity check) it reads the first of
:data:`KEYS` in ``trainer.callback_metrics`` (what ``self.log`` left there, synced across ranks when the module logs
it with ``sync_dist=True``), with the step it was logged at. Its readout, :class:`Validation`, is the recorder's last
for it, so :meth:`callbacks.judges.base.Judge.conclude` finds it with ``readouts.get(Validation)`` (None: the module
logs no validation loss under those names, or did not validate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from callbacks._cadence import Cadence, Moment
from callbacks._stats import Summary
from callbacks.probes.base import Probe

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: the names a validation loss is logged under, in the order looked for (Lightning's examples, ``train.py``'s)
KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch", "val/loss_epoch", "loss/val")


@dataclass
class Validation:
    prefix: ClassVar[str] = "validation"  # its probe's: a judge reads it as `readouts.get(Validation)`
    step: int  # the global step of the validation run
    value: float  # the logged validation loss
    key: str  # the name it was logged under


class ValidationProbe(Probe):
    """Reads the logged validation loss after each validation run (see the module docstring)."""

    prefix = "validation"
    has_histograms = False

    def __init__(self) -> None:
        super().__init__(Cadence(0, 0, 0))  # never on a training step
        self.reset()

    def validated(self, trainer: pl.Trainer) -> Validation | None:
        metrics = trainer.callback_metrics
        for key in KEYS:
            if key in metrics:
                try:
                    value = float(metrics[key])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    self.latest = Validation(trainer.global_step, value, key)
                    return self.latest
        return None

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Validation | None:
        return self.latest  # (not on a training step: its cadence never records)
