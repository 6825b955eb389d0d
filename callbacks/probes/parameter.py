"""Parameters and their gradients, read right before the optimizer step: the lecture's grad:data ratio.

Read in ``on_before_optimizer_step``, where the gradients are final: accumulated, all-reduced by DDP and
unscaled by AMP; with several optimizers each optimizer's parameters are read before its own step. Every rank
takes part in the same reduction: under DDP every rank holds the same tensors, so rank zero contributes them and
the others nothing; under FSDP2 (``fully_shard``: ``DTensor`` parameters and gradients) every rank contributes
its local shard, so the statistics and histograms are those of the full tensors, never gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._layer_order import biases_before_batchnorm
from callbacks._selection import select_parameters
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar, draw_summaries

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.optim import Optimizer

try:  # torch >= 2.4 (FSDP2)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - older torch, no FSDP2 either
    DTensor = Replicate = None  # type: ignore[assignment,misc]


def local_part(t: Tensor, trainer: pl.Trainer) -> Tensor | None:
    """What this rank contributes of ``t`` to a statistic over the full tensor, or None (nothing).

    A ``DTensor`` (FSDP2) contributes its local shard, from one rank per replica (the first along each
    replicated mesh dim); a plain tensor, the same on every rank (DDP), is contributed by rank zero.
    """
    if DTensor is not None and isinstance(t, DTensor):
        mesh = t.device_mesh
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Replicate) and mesh.size(dim) > 1 and mesh.get_local_rank(dim) != 0:
                return None
        return t.to_local()
    return t if trainer.world_size <= 1 or trainer.global_rank == 0 else None


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, else ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


class Parameters:
    """The watched parameters: ``params`` patterns (default: all trainable ones) with at least ``min_ndim`` dims."""

    def __init__(self, params: tuple[str, ...] | None, min_ndim: int) -> None:
        self.params = params
        self.min_ndim = min_ndim
        self.named: dict[str, Tensor] = {}  # tag name (without `_orig_mod.`) -> parameter
        self._of: dict[int, list[tuple[str, Tensor, dict]]] = {}  # id(optimizer) -> its watched parameters

    def attach(self, pl_module: pl.LightningModule, owner: str) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        params = dict(pl_module.named_parameters())
        self.named = {tag_name(n): params[n] for n in select_parameters(pl_module, self.params, self.min_ndim)}
        self._of = {}
        if not self.named:
            rank_zero_warn(
                f"{owner} found no parameter to watch (trainable, >= {self.min_ndim}-D"
                f"{', matching ' + repr(list(self.params)) if self.params else ''})."
            )

    def of(self, optimizer: Optimizer) -> list[tuple[str, Tensor, dict]]:
        """The watched parameters that ``optimizer`` steps, each with its parameter group (found once a fit)."""
        found = self._of.get(id(optimizer))
        if found is None:
            groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
            found = self._of[id(optimizer)] = [(n, p, groups[id(p)]) for n, p in self.named.items() if id(p) in groups]
        return found


@dataclass
class ParameterGradient:
    name: str
    shape: tuple[int, ...]
    data: Summary
    grad: Summary
    grad_to_data: float  # grad std / data std


@dataclass
class ParameterGradients:
    prefix: ClassVar[str] = "param_grad"  # its probe's: a judge reads it as `readouts[ParameterGradients]`
    step: int
    params: list[ParameterGradient]
    biases_before_norm: list[tuple[str, str]]  # (bias, "norm (BatchNorm1d)"): biases a batch norm subtracts


CHART = Chart("weight grad:data ratio (grad std / weight std)", "param_grad/grad_to_data", order=50)


class ParameterProbe(Probe):
    """Watches parameters and their gradients.

    Tags: histograms ``param/{name}`` and ``param_grad/{name}``; scalars ``param_grad/{name}/std``,
    ``param_grad/{name}/grad_to_data`` and ``param_grad/{name}/nonfinite`` (from the first step with NaN/inf).
    Parameters without a gradient this step (frozen, unused) get ``param/`` only.
    """

    prefix = "param_grad"
    figure_tag = "param_grad/distribution"

    def __init__(self, params: tuple[str, ...] | None, min_ndim: int, cadence: Cadence, bins: int) -> None:
        super().__init__(cadence, bins)
        self.selection = Parameters(params, min_ndim)
        self.owner = "ParameterMonitor"
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.selection.named = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._seen: list[str] = []  # the tags added this step, in parameter order (the same on every rank)
        self._data: dict[str, Summary] = {}  # this step's `param/` summaries (with a gradient or not)
        self._biases: list[tuple[str, str]] = []

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.selection.attach(pl_module, self.owner)
        self._shapes = {n: tuple(p.shape) for n, p in self.selection.named.items()}
        self._biases = biases_before_batchnorm(pl_module)

    def detach(self) -> None:
        self.selection.named = {}

    def before_optimizer_step(self, rec: Recording, optimizer: Optimizer) -> None:
        moment = rec.moments.get(self)
        pairs = self.selection.of(optimizer)
        if rec.tracing:  # each gradient's norm, every step (this rank's shard under FSDP2)
            grads = [(f"grad/{name}", p.grad) for name, p, _ in pairs if p.grad is not None]
            if grads:
                norms = [torch.linalg.vector_norm(_local(g), dtype=torch.float32) for _, g in grads]
                rec.trace(tuple(c for c, _ in grads), torch.stack(norms))
        if moment is None:
            return
        for name, p, _ in pairs:
            for tag, t in ((f"param/{name}", p), (f"param_grad/{name}", p.grad)):
                if t is None or tag in self._seen:
                    continue
                self._seen.append(tag)  # the gradients are the same on every rank: DDP and FSDP2 reduce them
                local = local_part(t, rec.trainer)
                if local is not None:
                    rec.add(tag, local, histogram=moment.histograms)

    def trace_columns(self) -> list[str]:
        return [f"grad/{name}" for name in self.selection.named]

    def tags(self, moment: Moment) -> tuple[list[str], set[str]]:
        tags, self._seen = self._seen, []
        return tags, set(tags) if moment.histograms else set()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> ParameterGradients:
        params = []
        for name in self.selection.named:
            data, grad = summaries.get(f"param/{name}"), summaries.get(f"param_grad/{name}")
            if data is None or grad is None:
                continue
            ratio = grad.std / data.std if data.std > 0 else math.nan
            params.append(ParameterGradient(name, self._shapes.get(name, ()), data, grad, ratio))
        readout = ParameterGradients(step, params, self._biases)
        self._data = {n: s for n, s in summaries.items() if n.startswith("param/")}
        return self._keep(readout, moment, bool(params))

    def scalars(self, readout: ParameterGradients) -> list[Scalar]:
        out = []
        for p in readout.params:
            tag = f"param_grad/{p.name}"
            out += self._nonfinite_scalar(tag, p.grad.nonfinite)
            out.append(Scalar(f"{tag}/std", p.grad.std))
            out.append(Scalar(f"{tag}/grad_to_data", p.grad_to_data, p.name, CHART))
        return out

    def histograms(self, readout: ParameterGradients) -> dict[str, Summary]:
        out = dict(self._data)  # every parameter's data, with a gradient or not
        out.update({f"param_grad/{p.name}": p.grad for p in readout.params})
        return out

    def draw(self) -> Figure | None:
        if self.last is None:
            return None
        curves = (
            (f"{p.name} {p.shape}", p.grad, f"std {p.grad.std:.1e}, grad:data {p.grad_to_data:.1e}")
            for p in self.last.params
        )
        return draw_summaries(curves, f"weights gradient distribution (step {self.last.step})", xlabel="gradient")

    def rows(self) -> tuple[list[str], list[list[str]]]:
        params = self.latest.params if self.latest is not None else []
        rows = [
            [p.name, str(p.shape), f"{p.grad.mean:+.3e}", f"{p.grad.std:.3e}", f"{p.grad_to_data:.3e}"] for p in params
        ]
        return ["parameter", "shape", "grad mean", "grad std", "grad:data"], rows
