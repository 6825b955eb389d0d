"""Parameters, their gradients and their updates: ``ParameterMonitor``, ``UpdateRatioMonitor``.

Both work from ``on_before_optimizer_step``, where the gradients are final: accumulated, all-reduced
by DDP and unscaled by AMP; with several optimizers (automatic or manual optimization) each optimizer's
parameters are read before its own step. With several processes every rank takes part in the same
collectives: under DDP every rank holds the same tensors, so rank zero contributes them and the others
zeros; under FSDP2 (``fully_shard``, parameters and gradients are ``DTensor``) every rank contributes
the statistics of its local shard, and counts, sums, sums of squares, min/max and bin counts are summed
or maxed: the statistics and histograms are those of the full tensors, never gathered.
"""

import math
import statistics
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from callbacks._base import _Monitor
from callbacks._compile import tag_name
from callbacks._selection import check_patterns, select_parameters
from callbacks._stats import StatsBuffer, Summary

_WIDE = (torch.float32, torch.float64)

try:  # torch >= 2.4 (FSDP2)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - older torch, no FSDP2 either
    DTensor = Replicate = None  # type: ignore[assignment,misc]


def _check_ndim(min_ndim: int) -> int:
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
        raise ValueError(f"Expected `min_ndim` to be an int >= 0, but got {min_ndim!r}.")
    return min_ndim


def _local_part(t: Tensor, trainer: "pl.Trainer") -> Tensor | None:
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


class _ParamMonitor(_Monitor):
    def __init__(self, params: Sequence[str] | None, min_ndim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = check_patterns(params, "params")
        self.min_ndim = _check_ndim(min_ndim)
        self._named: dict[str, Tensor] = {}  # tag name (without `_orig_mod.`) -> parameter

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {"params": list(self.params or ()), "min_ndim": self.min_ndim}

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        params = dict(pl_module.named_parameters())
        self._named = {tag_name(n): params[n] for n in select_parameters(pl_module, self.params, self.min_ndim)}
        if not self._named:
            rank_zero_warn(
                f"{type(self).__name__} found no parameter to watch (trainable, >= {self.min_ndim}-D"
                f"{', matching ' + repr(list(self.params)) if self.params else ''})."
            )

    def _in_optimizer(self, optimizer: Optimizer) -> list[tuple[str, Tensor]]:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [(n, p) for n, p in self._named.items() if id(p) in ids]

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._named = {}


class ParameterMonitor(_ParamMonitor):
    r"""Logs parameters and their gradients: the lecture's weight-gradient statistics and grad:data ratio.

    For each selected parameter ``name`` (from ``named_parameters()``), on logged steps, read right
    before the optimizer step:

    - histograms ``param/{name}`` and ``param_grad/{name}`` (TensorBoard only);
    - scalars ``param_grad/{name}/std``, ``param_grad/{name}/grad_to_data`` (``grad.std() / data.std()``)
      and ``param_grad/{name}/nonfinite`` (from the first step with NaN/inf on).

    The figure ``param_grad/distribution`` overlays every gradient histogram with a legend of mean, std
    and grad:data ratio. Parameters without a gradient this step (frozen, unused) get ``param/`` only.
    A ratio below ``vanishing_grad_to_data`` for 3 logged steps is warned about once.

    Args:
        params: ``fnmatch`` patterns of parameter names; default: all trainable ones with ``min_ndim``.
        min_ndim: only parameters with at least this many dims; default 2 (weights and embeddings, not
            biases or norm gains), as in the lecture.
        every_n_steps: log scalars every n optimizer steps; default ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: first histogram step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        bins: histogram bins.
        vanishing_grad_to_data: grad:data ratio below which a parameter's gradient is "vanishing".
        warn: emit health warnings.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ParameterMonitor

        trainer = Trainer(callbacks=[ParameterMonitor(params=["net.*.weight"])])
    """

    _prefix = "param_grad"
    _chart_titles: ClassVar[dict[tuple[str, str], tuple[str, int]]] = {
        ("param_grad/", "/grad_to_data"): ("weight grad:data ratio (grad std / weight std)", 5),
    }
    _figure_tag = "param_grad/distribution"
    _patience = 3

    def __init__(
        self,
        params: Sequence[str] | None = None,
        min_ndim: int = 2,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        vanishing_grad_to_data: float = 1e-5,
        warn: bool = True,
    ) -> None:
        super().__init__(
            params,
            min_ndim,
            every_n_steps=every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            figure_every_n_steps=figure_every_n_steps,
            bins=bins,
            warn=warn,
        )
        if isinstance(vanishing_grad_to_data, bool) or not isinstance(vanishing_grad_to_data, (int, float)):
            raise ValueError(f"Expected `vanishing_grad_to_data` to be a number, but got {vanishing_grad_to_data!r}.")
        self.vanishing_grad_to_data = float(vanishing_grad_to_data)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._ratios: dict[str, float] = {}
        self._last_step = -1  # the step of `_last`

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self._active:
            return
        pairs = self._in_optimizer(optimizer)
        if not pairs:
            return
        step = self._step
        if self._last_step != step:  # the first optimizer of this step (several step in manual optimization)
            self._last_step, self._last = step, {}
        single = trainer.world_size <= 1
        if single and not self._hist_now and self._scalars_now and self._log_stds(trainer, pairs):
            return
        buffer = StatsBuffer()
        keys = []
        error: BaseException | None = None
        for name, p in pairs:
            self._shapes[name] = tuple(p.shape)
            keys.append(f"param/{name}")
            if p.grad is not None:  # the same on every rank: DDP and FSDP2 reduce every gradient
                keys.append(f"param_grad/{name}")
            if error is not None:
                continue
            try:
                for key, t in ((f"param/{name}", p), (f"param_grad/{name}", p.grad)):
                    local = _local_part(t, trainer) if t is not None else None
                    if local is not None:
                        buffer.add(key, local, keep=self._hist_now)
            except Exception as e:  # raised on every rank by `reduce`, after the collectives
                error = e
        summaries = buffer.reduce(
            keys,
            trainer.strategy.root_device,
            self._reducer(trainer),
            self._hist_now,
            self.bins,
            error=self._take_error(error),
            who=f"{type(self).__name__} (step {step}, rank {trainer.global_rank})",
            rank=trainer.global_rank,
        )
        self._write_guarded(trainer, lambda: self._write(trainer, keys, summaries, step))

    def _write(self, trainer: "pl.Trainer", keys: list[str], summaries: dict[str, Summary], step: int) -> None:
        metrics: dict[str, float] = {}
        grads: dict[str, Summary] = {}
        bad = [k for k in keys if k in summaries and summaries[k].nonfinite]
        where = (
            f"first in parameter order: `{bad[0]}` of {len(bad)} affected, step {step},"
            f" rank {summaries[bad[0]].nonfinite_rank}"
            if bad
            else ""
        )
        for key, s in summaries.items():
            if self._hist_now:
                self._log_histogram(trainer, key, s, step)
            if not key.startswith("param_grad/"):
                continue
            name = key[len("param_grad/") :]
            self._check_nonfinite(key, s, where)
            data = summaries[f"param/{name}"]
            ratio = s.std / data.std if data.std > 0 else float("nan")
            grads[name] = s
            if self._scalars_now:
                metrics.update(self._nonfinite_metric(key, s))
                metrics.update(self._grad_scalars(name, s.std, ratio))
        self._log_scalars(trainer, metrics, step)
        self._last.update(grads)
        if self._hist_now:
            self._last_hist_step = step
        if self._figure_now:
            self._log_figure(trainer, step)

    def _grad_scalars(self, name: str, grad_std: float, ratio: float) -> dict[str, float]:
        """The scalars of one parameter's gradient (and the health check on them)."""
        self._ratios[name] = ratio
        self._check(
            f"vanishing/{name}",
            ratio < self.vanishing_grad_to_data or grad_std == 0.0,
            self._patience,
            f"gradient of `{name}` is vanishing: grad:data ratio {ratio:.2e} (< {self.vanishing_grad_to_data:.0e})"
            f" for {self._patience} logged steps. Check for saturated activations or a too-small init after it.",
        )
        return {f"param_grad/{name}/std": grad_std, f"param_grad/{name}/grad_to_data": ratio}

    def _log_stds(self, trainer: "pl.Trainer", pairs: list[tuple[str, Tensor]]) -> bool:
        """Logs the scalars of a step without histograms from two ``std`` per parameter, no more.

        Returns False, having logged nothing, when some std is not finite (NaN/inf in a tensor, or a tensor
        of one element): the full statistics then count and leave out the non-finite values.
        """
        with_grad = [(n, p) for n, p in pairs if p.grad is not None]
        if not with_grad:
            return True
        with torch.no_grad():
            tensors = [t for _, p in with_grad for t in (p.grad, p)]
            # 16-bit tensors in float32 (torch.stack promotes float32 and float64 alike)
            stds = torch.stack([t.std() if t.dtype in _WIDE else t.float().std() for t in tensors]).tolist()
        if not all(math.isfinite(v) for v in stds):
            return False
        metrics: dict[str, float] = {}
        for k, (name, p) in enumerate(with_grad):
            self._shapes[name] = tuple(p.shape)
            grad_std, data_std = stds[2 * k], stds[2 * k + 1]
            if f"param_grad/{name}" in self._nonfinite_tags:
                metrics[f"param_grad/{name}/nonfinite"] = 0.0
            metrics.update(self._grad_scalars(name, grad_std, grad_std / data_std if data_std > 0 else math.nan))
        self._log_scalars(trainer, metrics, self._step)  # (figures fall on histogram steps, never here)
        return True

    @override
    def _draw_figure(self) -> Any:
        from callbacks.figures import Distribution, plot_distributions

        data = {
            f"{n} {tuple(self._shapes.get(n, ()))}": Distribution(
                s.edges,
                s.counts,
                f"std {s.std:.1e}, grad:data {self._ratios.get(n, math.nan):.1e}",
            )
            for n, s in self._last.items()
            if s.edges is not None and s.counts is not None
        }
        if not data:
            return None
        return plot_distributions(
            data, f"weights gradient distribution (step {self._last_hist_step})", xlabel="gradient"
        )

    @override
    def _summary_rows(self) -> tuple[list[str], list[list[str]]]:
        rows = [
            [n, str(self._shapes.get(n, ())), f"{s.mean:+.3e}", f"{s.std:.3e}", f"{self._ratios.get(n, math.nan):.3e}"]
            for n, s in self._last.items()
        ]
        return ["parameter", "shape", "grad mean", "grad std", "grad:data"], rows


class UpdateRatioMonitor(_ParamMonitor):
    r"""Logs the update:data ratio of each parameter, ``log10(std(p_after - p_before) / std(p_before))``.

    Measured around the optimizer step on logged steps (a copy of the parameters is taken in
    ``on_before_optimizer_step`` on those steps only), so it holds for any optimizer: for plain SGD it is
    the lecture's ``log10((lr * grad).std() / p.std())``. Logs scalars ``update_ratio/{name}`` and the
    figure ``update_ratio/history`` (every ratio over time, guide line at -3: "about 1e-3 is healthy").
    When the median parameter's ratio stays outside ``[low, high]`` for ``patience`` consecutive logged
    steps, the learning rate is warned about once (too low / too high). The median, because the learning
    rate is shared: one parameter far above the rest, like an output layer scaled down at init, is
    expected early on and raises nothing.
    The history is part of the checkpoint, so a resumed run continues its curves.

    Args:
        params: ``fnmatch`` patterns of parameter names; default: all trainable ones with ``min_ndim``.
        min_ndim: only parameters with at least this many dims (default 2, as in the lecture).
        every_n_steps: measure every n optimizer steps; default ``Trainer(log_every_n_steps)``.
        figure_every_n_steps: first histogram step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        low: log10 ratio below which updates are too small (learning rate too low).
        high: log10 ratio above which updates are too large (learning rate too high).
        patience: consecutive logged steps out of ``[low, high]`` before warning.
        warn: emit health warnings.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import UpdateRatioMonitor

        trainer = Trainer(log_every_n_steps=10, callbacks=[UpdateRatioMonitor()])
    """

    _prefix = "update_ratio"
    _chart_titles: ClassVar[dict[tuple[str, str], tuple[str, int]]] = {
        ("update_ratio/", ""): ("update:data ratio, log10: about -3 is healthy (> -2 lr too high, < -4 too low)", 6),
    }
    _figure_tag = "update_ratio/history"
    _histograms = False  # its figure (the history) falls on scalar steps

    def __init__(
        self,
        params: Sequence[str] | None = None,
        min_ndim: int = 2,
        every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        low: float = -4.0,
        high: float = -2.0,
        patience: int = 10,
        warn: bool = True,
    ) -> None:
        super().__init__(
            params, min_ndim, every_n_steps=every_n_steps, figure_every_n_steps=figure_every_n_steps, warn=warn
        )
        for arg, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Expected `{arg}` to be a number, but got {value!r}.")
        if low >= high:
            raise ValueError(f"Expected `low` < `high`, but got low={low} and high={high}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Expected `patience` to be an int >= 1, but got {patience!r}.")
        self.low, self.high, self.patience = float(low), float(high), patience
        self._before: dict[str, tuple[Tensor, Tensor | None]] = {}  # name -> (parameter, this rank's part before)
        #: logged steps and, per parameter, the log10 ratio at each (NaN where not measured)
        self.steps: list[int] = []
        self.history: dict[str, list[float]] = {}

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self._scalars_now:
            return
        for name, p in self._in_optimizer(optimizer):
            if p.grad is not None and name not in self._before:
                local = _local_part(p, trainer)  # the same names on every rank, this rank's part or None
                self._before[name] = (p, local.detach().clone() if local is not None else None)

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._before or not self._step_ends(trainer, pl_module, batch_idx):
            return
        # std(after - before) / std(before) from counts, sums and sums of squares: reducible over shards
        buffer = StatsBuffer()
        error: BaseException | None = None
        try:
            with torch.no_grad():
                for name, (p, before) in self._before.items():
                    after = _local_part(p, trainer)
                    if before is not None and after is not None:
                        # on a step with NaN/inf the difference is made again rather than held
                        buffer.add(
                            f"{name}/update",
                            after.detach() - before,
                            keep=False,
                            recompute=lambda a=after, b=before: a.detach() - b,
                        )
                        buffer.add(f"{name}/data", before, keep=False)
        except Exception as e:  # raised on every rank by `reduce`, after the collectives
            error = e
        names = list(self._before)
        self._before.clear()
        summaries = buffer.reduce(
            [f"{n}/{part}" for n in names for part in ("update", "data")],
            trainer.strategy.root_device,
            self._reducer(trainer),
            False,
            self.bins,
            error=self._take_error(error),
            who=f"{type(self).__name__} (step {self._step}, rank {trainer.global_rank})",
            rank=trainer.global_rank,
        )
        ratios = {}
        for n in names:
            update, data = summaries.get(f"{n}/update"), summaries.get(f"{n}/data")
            if update is not None and data is not None:
                ratio = update.std / data.std if data.std > 0 else math.nan
                ratios[n] = math.log10(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)
        self._write_guarded(trainer, lambda: self._record(trainer, ratios))
        self.cadence.finish_step()

    def _record(self, trainer: "pl.Trainer", ratios: dict[str, float]) -> None:
        step = self._step
        metrics = {f"update_ratio/{n}": v for n, v in ratios.items() if math.isfinite(v)}
        self._log_scalars(trainer, metrics, step)
        self.steps.append(step)
        for n in [*self.history, *(n for n in ratios if n not in self.history)]:  # stable legend order
            series = self.history.setdefault(n, [math.nan] * (len(self.steps) - 1))
            series.append(ratios.get(n, math.nan))
        # The learning rate is one number for every layer, so the rule reads the median parameter: a single
        # parameter far above the rest (an output layer scaled down at init: its small weights make every
        # update large relative to them, for the first thousands of steps) is expected, not a wrong lr.
        finite = sorted((v, n) for n, v in ratios.items() if math.isfinite(v))
        if finite:
            median = statistics.median(v for v, _ in finite)
            (lo, lo_name), (hi, hi_name) = finite[0], finite[-1]
            self._check(
                "lr/low",
                median < self.low,
                self.patience,
                f"updates are tiny: the median parameter's log10(update/data) is {median:.2f} < {self.low} for"
                f" {self.patience} logged steps (smallest: `{lo_name}` {lo:.2f}). The learning rate is probably"
                " too low.",
            )
            self._check(
                "lr/high",
                median > self.high,
                self.patience,
                f"updates are large: the median parameter's log10(update/data) is {median:.2f} > {self.high} for"
                f" {self.patience} logged steps (largest: `{hi_name}` {hi:.2f}). The learning rate is probably"
                " too high.",
            )
        self._last_hist_step = step
        if self._figure_now:
            self._log_figure(trainer, step)

    @override
    def _draw_figure(self) -> Any:
        from callbacks.figures import plot_update_ratios

        if not self.steps:
            return None
        return plot_update_ratios(self.history, self.steps)

    @override
    def _summary_rows(self) -> tuple[list[str], list[list[str]]]:
        rows = [[n, f"{v[-1]:+.2f}"] for n, v in self.history.items() if v]
        return ["parameter", "last log10(update/data)"], rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "steps": list(self.steps),
            "history": {n: list(v) for n, v in self.history.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.steps = list(state_dict.get("steps", []))
        self.history = {n: list(v) for n, v in state_dict.get("history", {}).items()}

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._before.clear()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._before.clear()
