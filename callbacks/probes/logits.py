"""The output layer's logits: log Z (their log-sum-exp) and their range, the sign of output logit divergence.

A language model's logits are free up to a constant per position: only their differences reach the loss. Nothing
then holds ``log Z = logsumexp(logits)`` near 0, and at a high learning rate it drifts far from it (Wortsman et al.
2023, "output logit divergence"): the logits leave the range where the softmax is well-conditioned (in bf16, a
logit of 300 keeps one digit after the point) and the loss diverges. PaLM's z-loss (``1e-4 * log Z ** 2`` added
to the loss) pins it near 0. The probe reads, on recorded steps, the output of the output layer (the model's last
``nn.Linear``, or the one named), per position (a row of the last dim): the mean, min and max of log Z, and the
largest and smallest logit, and the mean spread (max - min) of a row. All are declared states (sums, a max and a
min), so under DDP they are those of the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._stats import CHUNK, Summary
from callbacks.probes.attention import is_attention
from callbacks.probes.base import Chart, Probe, Recording, Scalar

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class OutputLogits:
    prefix: ClassVar[str] = "logits"  # its probe's: a judge reads it as `readouts[OutputLogits]`
    step: int
    layer: str  # "lm_head (Linear)"
    rows: int  # positions (rows of the last dim) measured
    log_z_mean: float
    log_z_min: float
    log_z_max: float
    logit_min: float
    logit_max: float
    spread: float  # mean over positions of max - min


CHART = Chart(
    "output logits: mean log Z (logsumexp; far from 0: output logit divergence, add z-loss)", "logits", order=82
)


class OutputLogitsProbe(Probe):
    """Watches the output layer's logits: log Z per position and the logits' range.

    Tags: ``logits/log_z`` (mean over positions), ``logits/log_z_max``, ``logits/log_z_min``, ``logits/max``,
    ``logits/min``, ``logits/spread``.

    Args:
        layer: the qualified name of the output layer (default: the model's last ``nn.Linear``).
        cadence: when it records (default: the scalars of ``Trainer(log_every_n_steps)``).
        require_attention: watch nothing in a model without attention modules (``HealthMonitor``'s default,
            see :func:`callbacks.probes.attention.is_attention`).

    Raises:
        ValueError: for a ``layer`` that is not a string.
    """

    prefix = "logits"
    has_histograms = False

    def __init__(
        self, layer: str | None = None, cadence: Cadence | None = None, require_attention: bool = False
    ) -> None:
        super().__init__(cadence or Cadence(histogram_every_n_steps=0))
        self.require_attention = require_attention
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"Expected `layer` to be None or a module name (str), but got {layer!r}.")
        self.layer = layer
        self.reset()
        for name in ("positions", "z_sum"):
            self.add_state(name, "sum")
        self.add_state("spread_sum", "sum")
        for name in ("z_max", "top"):
            self.add_state(name, "max")
        for name in ("z_min", "bottom"):
            self.add_state(name, "min")

    def reset(self) -> None:
        super().reset()
        self.watched: list[tuple[str, nn.Module]] = []

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layer is not None:
            try:
                module = pl_module.get_submodule(self.layer)
            except AttributeError:
                raise ValueError(
                    f"Expected `layer` to name a module of {type(pl_module).__name__}, but got {self.layer!r}:"
                    " pick one of its `named_modules()`."
                ) from None
            self.watched = [(tag_name(self.layer), module)]
            return
        if self.require_attention and not any(is_attention(m) for m in pl_module.modules()):
            self.watched = []
            return
        last = None
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Linear) and module.out_features >= 2:
                last = (tag_name(name), module)
        self.watched = [last] if last is not None else []

    def watching(self, trainer: pl.Trainer) -> bool:
        return bool(self.watched)

    def detach(self) -> None:
        self.watched = []

    def watched_modules(self) -> Sequence[tuple[str, nn.Module]]:
        return self.watched

    def on_output(self, rec: Recording, name: str, output: Tensor) -> None:
        if self not in rec.moments:
            return
        x = output.detach()
        rows = x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)  # (positions, classes)
        for chunk in rows.split(max(1, CHUNK // max(rows.shape[1], 1))):
            c = chunk.float()
            finite = torch.isfinite(c).all(-1)
            c = c[finite]
            if c.numel() == 0:
                continue
            z = torch.logsumexp(c, dim=-1).double()  # (n,)
            hi, lo = c.amax(-1).double(), c.amin(-1).double()
            self.positions += c.shape[0]
            self.z_sum += z.sum()
            self.spread_sum += (hi - lo).sum()
            self.z_max = torch.maximum(self.z_max, z.max())
            self.z_min = torch.minimum(self.z_min, z.min())
            self.top = torch.maximum(self.top, hi.max())
            self.bottom = torch.minimum(self.bottom, lo.min())

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> OutputLogits | None:
        n = float(self.positions)
        if n == 0 or not self.watched:
            return None
        name, module = self.watched[0]
        readout = OutputLogits(
            step,
            f"{name} ({type(module).__name__})",
            int(n),
            float(self.z_sum) / n,
            float(self.z_min),
            float(self.z_max),
            float(self.bottom),
            float(self.top),
            float(self.spread_sum) / n,
        )
        return self._keep(readout, moment, True)

    def scalars(self, readout: OutputLogits | None) -> list[Scalar]:
        if readout is None:
            return []
        return [
            Scalar("logits/log_z", readout.log_z_mean, readout.layer, CHART),
            Scalar("logits/log_z_max", readout.log_z_max),
            Scalar("logits/log_z_min", readout.log_z_min),
            Scalar("logits/max", readout.logit_max),
            Scalar("logits/min", readout.logit_min),
            Scalar("logits/spread", readout.spread),
        ]

    def rows(self) -> tuple[list[str], list[list[str]]]:
        r = self.latest
        rows = (
            []
            if r is None
            else [[r.layer, f"{r.log_z_mean:+.3g}", f"{r.log_z_min:+.3g} .. {r.log_z_max:+.3g}", f"{r.spread:.3g}"]]
        )
        return ["layer", "mean log Z", "log Z range", "mean spread"], rows
