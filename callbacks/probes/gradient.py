"""The gradients of the loss w.r.t. the outputs of watched modules (the lecture's ``out.grad``), per layer.

The probe registers a tensor hook on each watched output in its forward hook, so it sees ``dL/d output`` during
backward without ``retain_grad``, summarises it and lets it go. The values are those of the loss of the global
batch: each rank back-propagates the mean loss of its own share (so its activation gradients are the world size
times those of one process on the whole batch), which the probe divides back; with ``accumulate_grad_batches``
Lightning already divides each micro-batch's loss. With 16-bit AMP they are multiplied by the loss scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from callbacks._cadence import Cadence, Moment
from callbacks._selection import ModuleSpec, Watched, watch_modules
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar, draw_summaries

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


@dataclass
class LayerGradient:
    name: str
    label: str
    summary: Summary  # of dL/d(output), the loss being the global batch's


@dataclass
class Gradients:
    prefix: ClassVar[str] = "activation_grad"  # its probe's: a judge reads it as `readouts[Gradients]`
    step: int
    layers: list[LayerGradient]  # in the order the modules were selected


CHART = Chart("activation gradient std (similar in every layer is healthy)", "activation_grad/std", order=40)


def data_parallel_size(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """How many ranks split the batch: the world size, or the data-parallel dim of a 2-D mesh (FSDP2 + TP)."""
    mesh = getattr(pl_module, "device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is not None and "data_parallel" in names:
        return mesh["data_parallel"].size()
    return max(trainer.world_size, 1)


class GradientProbe(Probe):
    """Watches ``dL/d output`` of ``modules`` (default: every activation module).

    Tags: histogram ``activation_grad/{name}``; scalars ``activation_grad/{name}/std`` and ``/nonfinite`` (no
    mean: it averages to ~0 by construction).
    """

    prefix = "activation_grad"
    figure_tag = "activation_grad/distribution"

    def __init__(self, modules: tuple[ModuleSpec, ...] | None, cadence: Cadence, bins: int) -> None:
        super().__init__(cadence, bins)
        self.modules = modules
        self.owner = "GradientMonitor"
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.watched: list[Watched] = []
        self._replicas = 1

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watched = watch_modules(pl_module, self.modules, self.owner)
        self._replicas = data_parallel_size(trainer, pl_module)

    def detach(self) -> None:
        self.watched = []

    def watched_modules(self) -> Sequence[tuple[str, Any]]:
        return [(w.name, w.module) for w in self.watched]

    def on_output(self, rec: Recording, name: str, output: Tensor) -> None:
        moment = rec.moments.get(self)
        if moment is None or not output.requires_grad:
            return
        tag, hist = f"activation_grad/{name}", moment.histograms
        output.register_hook(rec.guard(lambda grad: rec.add(tag, grad, histogram=hist)))

    def tags(self, moment: Moment) -> tuple[list[str], set[str]]:
        tags = [f"activation_grad/{w.name}" for w in self.watched]
        return tags, set(tags) if moment.histograms else set()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Gradients:
        layers = [
            LayerGradient(w.name, w.label, s.scaled(1 / self._replicas) if self._replicas > 1 else s)
            for w in self.watched
            if (s := summaries.get(f"activation_grad/{w.name}")) is not None
        ]
        return self._keep(Gradients(step, layers), moment, bool(layers))

    def scalars(self, readout: Gradients) -> list[Scalar]:
        out = []
        for layer in readout.layers:
            tag = f"activation_grad/{layer.name}"
            out.append(Scalar(f"{tag}/std", layer.summary.std, layer.label, CHART))
            out += self._nonfinite_scalar(tag, layer.summary.nonfinite)
        return out

    def histograms(self, readout: Gradients) -> dict[str, Summary]:
        return {f"activation_grad/{layer.name}": layer.summary for layer in readout.layers}

    def draw(self) -> Figure | None:
        if self.last is None:
            return None
        curves = ((layer.label, layer.summary, f"std {layer.summary.std:.2e}") for layer in self.last.layers)
        return draw_summaries(curves, f"gradient distribution (step {self.last.step})", xlabel="gradient")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        layers = self.latest.layers if self.latest is not None else []
        return ["layer", "grad std"], [[layer.label, f"{layer.summary.std:.3e}"] for layer in layers]
