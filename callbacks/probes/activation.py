"""The forward outputs of watched modules: the lecture's activation statistics, saturation and dead units."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from callbacks._activation_kinds import Kind, activation_info, gradient_below_zero, saturation_spec
from callbacks._cadence import Cadence, Moment
from callbacks._layer_order import norm_before
from callbacks._selection import ModuleSpec, Watched, watch_modules
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar, draw_summaries

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


@dataclass
class Layer:
    """One watched module's output on a recorded step."""

    name: str
    label: str  # "net.2 (Tanh)"
    kind: Kind | None  # bounded, relu_like, other; None: not an activation (a module chosen by the user)
    summary: Summary
    saturation: float | None  # share near the bounds (bounded kinds)
    dead: float | None  # share of units never positive in the batch (ReLU-like kinds)
    gradient_below_zero: str | None  # "none" (ReLU) or "some" (GELU, SiLU, ...) for ReLU-like kinds
    norm_before: str | None  # "name (BatchNorm1d)" of a normalisation right before it


@dataclass
class Activations:
    prefix: ClassVar[str] = "activation"  # its probe's: a judge reads it as `readouts[Activations]`
    step: int
    layers: list[Layer]  # in the order the modules were selected (``named_modules``)


CHARTS = {
    "saturation": Chart(
        "activation saturation: share near the bounds (tanh: |y| > 0.97)", "activation/saturation", order=10
    ),
    "dead": Chart("dead units: share never positive in the batch (ReLU-like)", "activation/dead", order=20),
    "std": Chart("activation std", "activation/std", order=30),
}


class ActivationProbe(Probe):
    """Watches the forward outputs of ``modules`` (default: activation modules, see ``callbacks._activation_kinds``).

    Tags: histogram ``activation/{name}``; scalars ``activation/{name}/mean``, ``/std``, ``/saturation`` (bounded
    outputs), ``/dead`` (ReLU-like outputs) and ``/nonfinite`` (from the first step with NaN/inf). A module called
    several times per forward pools all its calls.
    """

    prefix = "activation"
    figure_tag = "activation/distribution"

    def __init__(
        self, modules: tuple[ModuleSpec, ...] | None, cadence: Cadence, bins: int, saturation_threshold: float
    ) -> None:
        super().__init__(cadence, bins)
        self.modules = modules
        self.saturation_threshold = saturation_threshold
        self.owner = "ActivationMonitor"  # the name its warnings give
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.watched: list[Watched] = []
        self._facts: dict[str, tuple[Any, ...]] = {}  # name -> (kind, saturation spec, relu-like, below zero, norm)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watched = watch_modules(pl_module, self.modules, self.owner)
        for w in self.watched:
            info = activation_info(w.module)
            self._facts[w.name] = (
                info.kind if info is not None else None,
                saturation_spec(w.module, self.saturation_threshold),
                info is not None and info.kind == "relu_like",
                gradient_below_zero(w.module),
                norm_before(pl_module, w.qualified),
            )

    def detach(self) -> None:
        self.watched = []

    def watched_modules(self) -> Sequence[tuple[str, Any]]:
        return [(w.name, w.module) for w in self.watched]

    def on_output(self, rec: Recording, name: str, output: Tensor) -> None:
        moment = rec.moments.get(self)
        if moment is not None:
            _, saturation, relu_like, _, _ = self._facts[name]
            hist = moment.histograms
            rec.add(f"activation/{name}", output, histogram=hist, saturation=saturation, relu_like=relu_like)
        if rec.tracing:  # the root mean square, every step
            x = output.detach()
            rec.trace(f"act/{name}", torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(max(x.numel(), 1)))

    def trace_columns(self) -> list[str]:
        return [f"act/{w.name}" for w in self.watched]

    def tags(self, moment: Moment) -> tuple[list[str], set[str]]:
        tags = [f"activation/{w.name}" for w in self.watched]
        return tags, set(tags) if moment.histograms else set()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Activations:
        layers = []
        for w in self.watched:
            s = summaries.get(f"activation/{w.name}")
            if s is None:
                continue  # not called on any rank this step
            kind, saturation, relu_like, below, norm = self._facts[w.name]
            sat = s.saturation if saturation is not None else None
            layers.append(Layer(w.name, w.label, kind, s, sat, s.dead if relu_like else None, below, norm))
        return self._keep(Activations(step, layers), moment, bool(layers))

    def scalars(self, readout: Activations) -> list[Scalar]:
        out = []
        for layer in readout.layers:
            tag, s = f"activation/{layer.name}", layer.summary
            out += [Scalar(f"{tag}/mean", s.mean), Scalar(f"{tag}/std", s.std, layer.label, CHARTS["std"])]
            if layer.saturation is not None:
                out.append(Scalar(f"{tag}/saturation", layer.saturation, layer.label, CHARTS["saturation"]))
            if layer.dead is not None:
                out.append(Scalar(f"{tag}/dead", layer.dead, layer.label, CHARTS["dead"]))
            out += self._nonfinite_scalar(tag, s.nonfinite)
        return out

    def histograms(self, readout: Activations) -> dict[str, Summary]:
        return {f"activation/{layer.name}": layer.summary for layer in readout.layers}

    def draw(self) -> Figure | None:
        if self.last is None:
            return None
        curves = ((layer.label, layer.summary, _legend(layer)) for layer in self.last.layers)
        return draw_summaries(curves, f"activation distribution (step {self.last.step})")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        last = self.latest
        rows = [
            [
                layer.label,
                f"{layer.summary.mean:+.4f}",
                f"{layer.summary.std:.4f}",
                f"{layer.saturation:.2%}" if layer.saturation is not None else "",
                f"{layer.dead:.2%}" if layer.dead is not None else "",
            ]
            for layer in (last.layers if last is not None else [])
        ]
        return ["layer", "mean", "std", "saturation", "dead"], rows


def _legend(layer: Layer) -> str:
    text = f"mean {layer.summary.mean:+.2f}, std {layer.summary.std:.2f}"
    if layer.saturation is not None:
        text += f", saturated {layer.saturation:.2%}"
    if layer.dead is not None:
        text += f", dead {layer.dead:.2%}"
    return text
