"""The update:data ratio of each parameter, ``log10(std(p_after - p_before) / std(p_before))``, over time.

Measured around the optimizer step on recorded steps (a copy of each watched parameter, or of this rank's shard,
is taken right before its optimizer steps, and let go as soon as its update is summarised), so it holds for any
optimizer: for plain SGD it is the lecture's ``log10((lr * grad).std() / p.std())``. The history is part of the
checkpoint, so a resumed run continues its curves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar
from callbacks.probes.loss import output_layer
from callbacks.probes.parameter import DTensor, Parameters, local_part

if TYPE_CHECKING:
    from collections.abc import Callable

    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.optim import Optimizer


def _nothing() -> None:
    """No figure (nothing recorded yet)."""


@dataclass
class UpdateRatios:
    prefix: ClassVar[str] = "update_ratio"  # its probe's: a judge reads it as `readouts[UpdateRatios]`
    step: int
    ratios: dict[str, float]  # parameter -> log10(update std / data std) this step (finite or not)
    steps: list[int]  # every recorded step so far (the history's x axis)
    history: dict[str, list[float]]  # parameter -> log10 ratio at each of `steps` (NaN where not measured)
    lrs: dict[str, list[float]]  # parameter -> its learning rate at each of `steps` (NaN where not known)
    output: str | None = None  # the output layer's weight (the last nn.Linear's), if watched


#: elements of each parameter sampled for the trace's update:data ratio (about 10 % relative error on a ratio)
SAMPLE = 64
#: the lecture's guide line: an update about a thousandth of the weight
GUIDE = -3.0
CHART = Chart(
    "update:data ratio, log10: about -3 is healthy (> -2 lr too high, < -4 too low)",
    "update_ratio",
    order=60,
    guide=GUIDE,
)


def _flat(p: Tensor) -> Tensor:
    """This rank's part of a parameter as a flat view (the local shard of a ``DTensor``), detached."""
    local = p.to_local() if DTensor is not None and isinstance(p, DTensor) else p
    return local.detach().reshape(-1)


class UpdateProbe(Probe):
    """Watches each parameter's update. Tags: scalars ``update_ratio/{name}``; figure ``update_ratio/history``."""

    prefix = "update_ratio"
    figure_tag = "update_ratio/history"
    has_histograms = False

    def __init__(self, params: tuple[str, ...] | None, min_ndim: int, cadence: Cadence) -> None:
        super().__init__(cadence)
        self.selection = Parameters(params, min_ndim)
        self.owner = "UpdateRatioMonitor"
        #: recorded steps and, per parameter, the log10 ratio and the learning rate at each (NaN where not known)
        self.steps: list[int] = []
        self.history: dict[str, list[float]] = {}
        self.lrs: dict[str, list[float]] = {}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.selection.named = {}
        self._before: dict[str, tuple[Tensor, Tensor | None]] = {}  # name -> (parameter, this rank's part before)
        self._seen: list[str] = []  # the parameters measured this step (the same on every rank)
        self._sample: dict[str, Tensor] = {}  # name -> the indices of its sampled elements (the trace; made once)
        self._sampled: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (parameter, its sample before the step)
        self._lr: dict[str, float] = {}  # name -> the learning rate of its parameter group at the last step
        self._output: str | None = None
        self.steps = []
        self.history = {}
        self.lrs = {}

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.selection.attach(pl_module, self.owner)
        last = output_layer(pl_module)
        self._output = tag_name(f"{last[0]}.weight") if last is not None else None

    def detach(self) -> None:
        self.selection.named = {}
        self._before.clear()

    def before_optimizer_step(self, rec: Recording, optimizer: Optimizer) -> None:
        moment = rec.moments.get(self)
        pairs = self.selection.of(optimizer)
        if rec.tracing:  # a fixed sample of each parameter, before its step
            for name, p, _ in pairs:
                if p.grad is not None and name not in self._sampled:
                    self._sampled[name] = (p, _flat(p)[self._sample_of(name, p)])
        if moment is None or not moment.scalars:
            return
        for name, p, group in pairs:
            if p.grad is None:
                continue
            self._lr[name] = float(group["lr"])
            if name not in self._before:
                local = local_part(p, rec.trainer)  # the same names on every rank, this rank's part or None
                self._before[name] = (p, local.detach().clone() if local is not None else None)

    def end_step(self, rec: Recording, outputs: Any) -> None:
        with torch.no_grad():
            if self._sampled:  # the trace: log10 update:data of each sample, one vectorised pass for all
                names = tuple(f"upd/{n}" for n in self._sampled)
                before = torch.stack([b for _, b in self._sampled.values()])  # (params, SAMPLE)
                after = torch.stack([_flat(p)[self._sample[n]] for n, (p, _) in self._sampled.items()])
                ratio = torch.linalg.vector_norm(after - before, dim=1) / torch.linalg.vector_norm(before, dim=1)
                rec.trace(names, torch.log10(ratio))
                self._sampled = {}
            # std(after - before) / std(before) from counts, sums and sums of squares: reducible over shards
            for name in list(self._before):
                p, before = self._before.pop(name)  # let go of each copy as soon as it is summarised
                after = local_part(p, rec.trainer)
                if before is not None and after is not None:
                    rec.add(f"{name}/update", after.detach() - before)
                    rec.add(f"{name}/data", before)
                self._seen.append(name)

    def trace_columns(self) -> list[str]:
        return [f"upd/{n}" for n in self.selection.named]

    def _sample_of(self, name: str, p: Tensor) -> Tensor:
        """The indices of the elements of ``p`` sampled for the trace: the same in every fit and on every rank."""
        idx = self._sample.get(name)
        if idx is None:
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            idx = self._sample[name] = torch.randint(0, max(_flat(p).numel(), 1), (SAMPLE,), generator=g).to(p.device)
        return idx

    def tags(self, moment: Moment) -> tuple[list[str], set[str]]:
        names, self._seen = self._seen, []
        return [f"{n}/{part}" for n in names for part in ("update", "data")], set()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> UpdateRatios:
        ratios = {}
        for tag, update in summaries.items():
            if not tag.endswith("/update") or (data := summaries.get(f"{tag[:-7]}/data")) is None:
                continue
            ratio = update.std / data.std if data.std > 0 else math.nan
            ratios[tag[:-7]] = math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)
        if ratios:
            self.steps.append(step)
            for n in [*self.history, *(n for n in ratios if n not in self.history)]:  # stable legend order
                series = self.history.setdefault(n, [math.nan] * (len(self.steps) - 1))
                series.append(ratios.get(n, math.nan))
                lrs = self.lrs.setdefault(n, [])
                lrs += [math.nan] * (len(self.steps) - 1 - len(lrs))  # (a checkpoint from before they were kept)
                lrs.append(self._lr.get(n, math.nan) if n in ratios else math.nan)
        return UpdateRatios(step, ratios, self.steps, self.history, self.lrs, self._output)

    def scalars(self, readout: UpdateRatios) -> list[Scalar]:
        return [Scalar(f"update_ratio/{n}", v, n, CHART) for n, v in readout.ratios.items() if math.isfinite(v)]

    def draw(self) -> Figure | None:
        from callbacks.figures import plot_update_ratios

        return plot_update_ratios(self.history, self.steps, guide=GUIDE) if self.steps else None

    def drawing(self) -> Callable[[], Figure | None]:
        from callbacks.figures import plot_update_ratios

        # the history grows in place at every recorded step: the figure is drawn from a copy of it as it is now
        history, steps = {n: list(v) for n, v in self.history.items()}, list(self.steps)
        return functools.partial(plot_update_ratios, history, steps, guide=GUIDE) if steps else _nothing

    def rows(self) -> tuple[list[str], list[list[str]]]:
        rows = [[n, f"{v[-1]:+.2f}"] for n, v in self.history.items() if v]
        return ["parameter", "last log10(update/data)"], rows

    def state_dict(self) -> dict[str, Any]:
        history = {n: list(v) for n, v in self.history.items()}
        return {"steps": list(self.steps), "history": history, "lrs": {n: list(v) for n, v in self.lrs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = list(state.get("steps", []))
        self.history = {n: list(v) for n, v in state.get("history", {}).items()}
        self.lrs = {n: list(v) for n, v in state.get("lrs", {}).items()}
