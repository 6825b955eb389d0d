"""Outlier features: the kurtosis of each watched module's output, as Composer's activation monitor reports it.

A Transformer whose few "outlier features" grow far above the rest has activations with heavy tails: a kurtosis
far above a Gaussian's 3 (outlier features make it tens to thousands), long before its loss says anything. The
kurtosis ``E[(y - mean)^4] / var^2`` (Pearson's, population moments: ``scipy.stats.kurtosis(fisher=False)``) and the
skewness ``E[(y - mean)^3] / var^1.5`` come from the first four power sums of the output, which add up over module
calls, micro-batches and ranks: the probe declares them as ``"sum"`` states and the largest ``|y|`` as a ``"max"``
state (:meth:`callbacks.probes.base.Probe.add_state`), and the recorder reduces them with every other probe's in one
collective per kind. NaN/inf are left out.

This file is the example of a probe with statistics of its own: nothing else in ``callbacks/`` knows about it.
Use it as a monitor of its own (``Monitor(KurtosisProbe(), [], warn=True)``) or as a part of a recorder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from callbacks._cadence import Cadence, Moment
from callbacks._selection import ModuleSpec, Watched, check_specs, watch_modules
from callbacks._stats import CHUNK, Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class LayerMoments:
    """One watched module's output on a recorded step."""

    name: str
    label: str  # "net.2 (Tanh)"
    count: int  # finite values
    kurtosis: float  # E[(y - mean)^4] / var^2: 3 for a Gaussian (NaN: fewer than 2 values, or all equal)
    skewness: float  # E[(y - mean)^3] / var^1.5: 0 for a symmetric distribution
    peak: float  # max |y|


@dataclass
class Kurtosis:
    prefix: ClassVar[str] = "activation_kurtosis"  # its probe's: a judge reads it as `readouts[Kurtosis]`
    step: int
    layers: list[LayerMoments]  # in the order the modules were selected


# no `order`: a new probe's chart goes after the built-in ones, no slot to pick
CHART = Chart("activation kurtosis: 3 for a Gaussian; outlier features push it far above", "activation_kurtosis")


def moments(count: float, s1: float, s2: float, s3: float, s4: float) -> tuple[float, float]:
    """``(kurtosis, skewness)`` from the power sums ``s_k = sum(y^k)`` of ``count`` values (NaN when undefined)."""
    if count < 2:
        return math.nan, math.nan
    mean = s1 / count
    m2 = s2 / count - mean * mean  # the central moments from the raw ones
    m3 = s3 / count - 3 * mean * s2 / count + 2 * mean**3
    m4 = s4 / count - 4 * mean * s3 / count + 6 * mean * mean * s2 / count - 3 * mean**4
    if m2 <= 0:
        return math.nan, math.nan
    return m4 / (m2 * m2), m3 / m2**1.5


class KurtosisProbe(Probe):
    """Watches the forward outputs of ``modules`` (default: every activation module) for heavy tails.

    Tags: scalars ``activation_kurtosis/{name}`` (Pearson's kurtosis, 3 for a Gaussian) and
    ``activation_kurtosis/{name}/skewness``.

    Args:
        modules: module types and/or ``fnmatch`` patterns of qualified names; default: every activation module.
        cadence: when it records (default: the scalars of ``Trainer(log_every_n_steps)``).

    Raises:
        ValueError: for a ``modules`` entry that is neither an ``nn.Module`` subclass nor a name pattern.
    """

    prefix = "activation_kurtosis"
    has_histograms = False

    def __init__(self, modules: Sequence[ModuleSpec] | None = None, cadence: Cadence | None = None) -> None:
        super().__init__(cadence or Cadence(histogram_every_n_steps=0))
        self.modules = check_specs(modules, "modules")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.watched: list[Watched] = []
        self._index: dict[str, int] = {}  # name -> its entry in the states

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watched = watch_modules(pl_module, self.modules, "KurtosisProbe")
        self._index = {w.name: i for i, w in enumerate(self.watched)}
        n = len(self.watched)  # one entry per watched module, the same on every rank
        for k in ("count", "s1", "s2", "s3", "s4"):
            self.add_state(k, "sum", n)  # power sums: they add up over calls, micro-batches and ranks
        self.add_state("peak", "max", n)

    def detach(self) -> None:
        self.watched = []

    def watched_modules(self) -> Sequence[tuple[str, nn.Module]]:
        return [(w.name, w.module) for w in self.watched]

    def on_output(self, rec: Recording, name: str, output: Tensor) -> None:
        if self not in rec.moments:
            return
        i = self._index[name]
        for chunk in output.detach().reshape(-1).split(CHUNK):  # float64 temporaries of at most CHUNK elements
            y = chunk.to(torch.float64)
            finite = torch.isfinite(y)
            y = y.where(finite, 0.0)
            y2 = y * y
            self.count[i] += finite.sum()
            self.s1[i] += y.sum()
            self.s2[i] += y2.sum()
            self.s3[i] += (y2 * y).sum()
            self.s4[i] += (y2 * y2).sum()
            self.peak[i] = torch.maximum(self.peak[i], y.abs().max())

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Kurtosis:
        layers = []
        for w, n, s1, s2, s3, s4, peak in zip(
            self.watched, *(getattr(self, k).tolist() for k in ("count", "s1", "s2", "s3", "s4", "peak")), strict=True
        ):
            if n == 0:
                continue  # not called on any rank this step
            kurtosis, skewness = moments(n, s1, s2, s3, s4)
            layers.append(LayerMoments(w.name, w.label, int(n), kurtosis, skewness, peak))
        return self._keep(Kurtosis(step, layers), moment, bool(layers))

    def scalars(self, readout: Kurtosis) -> list[Scalar]:
        out = []
        for layer in readout.layers:
            tag = f"activation_kurtosis/{layer.name}"
            out += [Scalar(tag, layer.kurtosis, layer.label, CHART), Scalar(f"{tag}/skewness", layer.skewness)]
        return out

    def rows(self) -> tuple[list[str], list[list[str]]]:
        layers = self.latest.layers if self.latest is not None else []
        rows = [[x.label, f"{x.kurtosis:.2f}", f"{x.skewness:+.2f}", f"{x.peak:.3g}"] for x in layers]
        return ["layer", "kurtosis", "skewness", "max |y|"], rows
