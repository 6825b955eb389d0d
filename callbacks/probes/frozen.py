"""Which layers are frozen (``requires_grad=False``): read once, at the start of fit.

A layer frozen on purpose (fine-tuning a pretrained model, a frozen embedding) is fine; one frozen by mistake in a
model trained from scratch keeps its random init for the whole fit (the fault studies' "layer frozen by mistake").
The probe lists, on the first step it records, each module with a weight matrix (``Linear``, ``Conv``, ...; not an
``Embedding``) whose parameters are all frozen, while others train; :class:`callbacks.judges.frozen.FrozenLayers`
tells the two cases apart by the loss at step 0. The parameters' flags are the same on every rank: nothing is
reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._stats import Summary
from callbacks.probes.base import Probe

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class FrozenModules:
    prefix: ClassVar[str] = "frozen"  # its probe's: a judge reads it as `readouts[FrozenModules]`
    step: int
    modules: list[str] = field(default_factory=list)  # qualified names of the frozen layers with weights
    trainable: int = 0  # parameters (tensors) that do train


def _weighted(m: nn.Module) -> bool:
    weight = getattr(m, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() >= 2 and not isinstance(m, nn.Embedding)


class FrozenProbe(Probe):
    """Lists the frozen layers with weights, once, on the first step it records."""

    prefix = "frozen"
    has_histograms = False

    def __init__(self, cadence: Cadence) -> None:
        super().__init__(cadence)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._found: FrozenModules | None = None
        self._read = False

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = [
            tag_name(name)
            for name, m in pl_module.named_modules()
            if _weighted(m) and not any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        trainable = sum(p.requires_grad for p in pl_module.parameters())
        self._found = FrozenModules(0, frozen, trainable) if frozen and trainable else None

    def detach(self) -> None:
        self._found = None

    def watching(self, trainer: pl.Trainer) -> bool:
        return self._found is not None and not self._read

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> FrozenModules | None:
        self._read = True
        if self._found is None:
            return None
        return FrozenModules(step, list(self._found.modules), self._found.trainable)
