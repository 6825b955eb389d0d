"""The scale of what the model's first layer is given: inputs left unnormalised (raw pixels, raw features).

An init scaled for unit inputs (Kaiming's ``gain / sqrt(fan_in)`` assumes them) turns inputs of scale ``s`` into
pre-activations ``s`` times too large: a tanh or sigmoid after it saturates, and the first layer's gradients (and so
its effective learning rate) scale with ``s`` too. The fault studies' "inputs left unnormalised" (DeepCrime). The probe
reads, on the first :data:`CHECKED_STEPS` steps it records, the floating-point input of the model's first layer with
weights (its first ``Linear`` or ``Conv``; nothing in a model whose first such layer is an ``Embedding``: its input
is indices, and what follows it is given learnt features): its mean and its root mean square over every element,
as ``"sum"`` states (every micro-batch and rank of the step). It writes nothing;
:class:`callbacks.judges.data.UnnormalisedInputs` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._stats import Summary
from callbacks.probes.base import Probe, Recording

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: the first recorded steps whose inputs are read (the data's scale shows at once)
CHECKED_STEPS = 3
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Inputs:
    prefix: ClassVar[str] = "inputs"  # its probe's: a judge reads it as `readouts[Inputs]`
    step: int
    layer: str  # "net.blocks.0.linear (Linear)"
    elements: int  # input elements read on this step
    mean: float
    rms: float


class InputProbe(Probe):
    """Reads the mean and RMS of the first weighted layer's input on the first :data:`CHECKED_STEPS` recorded steps."""

    prefix = "inputs"
    has_histograms = False

    def __init__(self, cadence: Cadence) -> None:
        super().__init__(cadence)
        for name in ("count", "total", "squares"):
            self.add_state(name, "sum")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.watched: list[tuple[str, nn.Module]] = []
        self._checks = 0

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first = next(((n, m) for n, m in pl_module.named_modules() if isinstance(m, (*_LAYERS, nn.Embedding))), None)
        # a model that starts with an embedding takes indices: its first Linear is given learnt features, not data
        watch = first is not None and not isinstance(first[1], nn.Embedding)
        self.watched = [(tag_name(first[0]), first[1])] if watch else []  # type: ignore[index]

    def detach(self) -> None:
        self.watched = []

    def watching(self, trainer: pl.Trainer) -> bool:
        return bool(self.watched) and self._checks < CHECKED_STEPS

    def watched_modules(self) -> Sequence[tuple[str, nn.Module]]:
        return self.watched

    def start_states(self, device: torch.device) -> None:
        super().start_states(device)
        self._checks += 1

    def on_input(self, rec: Recording, name: str, input: Tensor) -> None:
        if self not in rec.moments:
            return
        with torch.no_grad():
            x = input.detach()
            finite = x[torch.isfinite(x)].double()
            self.count += finite.numel()
            self.total += finite.sum()
            self.squares += finite.square().sum()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Inputs | None:
        n = float(self.count)
        if n == 0 or not self.watched:
            return None
        name, module = self.watched[0]
        return Inputs(
            step, f"{name} ({type(module).__name__})", int(n), float(self.total) / n, math.sqrt(float(self.squares) / n)
        )
