"""Forward activations and their gradients, per selected module: ``ActivationMonitor``, ``GradientMonitor``.

Both select their modules in ``on_fit_start`` and register a forward hook on each of them for the
training batches of logged steps only (removed after the step). The hook adds the output's statistics
(computed on its device) to a per-step buffer, which is reduced across ranks and written after the
optimizer step. ``GradientMonitor`` registers a tensor hook on the output in that forward hook, so
it sees ``dL/d output`` during backward without ``retain_grad``.

A compiled model (a compiled submodule, or the whole module compiled before ``fit``) runs its recording
steps eagerly so the hooks fire (``callbacks._compile``). An error inside a hook is kept and raised at
the end of the step on every rank, after the collectives, so no rank waits forever for another.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from callbacks._base import _check_positive, _Monitor
from callbacks._compile import EagerSteps, tag_name
from callbacks._selection import (
    ModuleSpec,
    check_specs,
    empty_selection_message,
    is_relu_like,
    saturation_spec,
    select_modules,
)
from callbacks._stats import StatsBuffer, Summary
from callbacks._warnings import health_warning


def _first_tensor(output: Any) -> Tensor | None:
    """The module's output tensor, or the first floating-point tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
    return None


def _norm_before(root: nn.Module, qualified: str) -> str | None:
    """``"name (BatchNorm1d)"`` of the normalisation layer right before module ``qualified``, or None.

    "Right before" is the previous child of the same parent in registration order (``nn.Sequential``'s
    order, and the usual ``self.bn = ...; self.act = ...``), skipping dropout and identity layers; for a
    container, its last leaf. A norm layer is any whose class name has "Norm" in it (BatchNorm, LayerNorm,
    GroupNorm, RMSNorm, the lecture's hand-written ``BatchNorm1d``).
    """
    parent_name, _, child = qualified.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return None
    children = list(parent.named_children())
    names = [n for n, _ in children]
    if child not in names:
        return None
    for prev_name, prev in reversed(children[: names.index(child)]):
        leaf_name, leaf = prev_name, prev
        for sub_name, sub in prev.named_modules():
            if not list(sub.children()):
                leaf_name, leaf = f"{prev_name}.{sub_name}" if sub_name else prev_name, sub
        if isinstance(leaf, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)):
            continue
        if "norm" in type(leaf).__name__.lower():
            return f"{parent_name + '.' if parent_name else ''}{leaf_name} ({type(leaf).__name__})"
        return None
    return None


class _OutputMonitor(_Monitor):
    """Shared by the activation and activation-gradient monitors: module selection, hooks, flushing."""

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        warn: bool = True,
    ) -> None:
        super().__init__(every_n_steps, histogram_every_n_steps, figure_every_n_steps, bins, warn)
        self.modules = check_specs(modules, "modules")
        self._names: list[str] = []  # tag names: qualified names without torch.compile's `_orig_mod.`
        self._labels: dict[str, str] = {}  # name -> "name (Tanh)"
        self._hooks: list[tuple[nn.Module, Any]] = []  # (module, forward hook), registered on logged steps only
        self._handles: list[RemovableHandle] = []
        self._buffer = StatsBuffer()
        self._recording = False
        self._error: BaseException | None = None  # raised by a hook on this rank during the current step
        self._eager = EagerSteps()  # compiled models run eagerly on recording steps (see `callbacks._compile`)

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {"modules": [getattr(m, "__name__", m) for m in self.modules or ()]}

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._names = []
        self._hooks = []
        for qualified, module in select_modules(pl_module, self.modules):
            name = tag_name(qualified)
            if name in self._names:
                continue  # the same module reached through a compiled wrapper and its original
            self._names.append(name)
            self._labels[name] = f"{name} ({type(module).__name__})"
            self._hooks.append((module, self._make_hook(name, module)))
        self._eager.setup(pl_module, bool(self._names), type(self).__name__)
        if not self._names:
            health_warning(
                empty_selection_message(pl_module, type(self).__name__)
                if self.modules is None
                else f"{type(self).__name__} found no module matching"
                f" `modules=[{', '.join(getattr(m, '__name__', repr(m)) for m in self.modules)}]` in"
                f" {type(pl_module).__name__}: check the types and name patterns against its `named_modules()`."
            )

    def _make_hook(self, name: str, module: nn.Module) -> Any:
        raise NotImplementedError

    def _guard(self, fn: Any) -> Any:
        """Wraps a hook: an error is kept for the end of the step, where every rank raises it (no rank hangs)."""

        def guarded(*args: Any) -> None:
            if not self._recording or self._error is not None:
                return
            try:
                fn(*args)
            except Exception as error:  # re-raised on every rank in `on_train_batch_end`
                self._error = error

        return guarded

    @override
    def _on_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int, new_step: bool
    ) -> None:
        if new_step:
            self._buffer.clear()  # leftovers of an interrupted step
            self._error = None
        self._recording = self._active and bool(self._names)
        if self._recording and not self._handles:
            # hooks exist only during logged steps: a module with a forward hook takes nn.Module's slow call path
            self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
            self._eager.enter()  # and a compiled model runs them eagerly, its graphs untouched

    @override
    def on_train_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._recording = False
        if not self._active or not self._names or not self._step_ends(trainer, pl_module, batch_idx):
            return
        self._remove_handles()
        # every rank reduces the same names, even those its own forward never reached; an error of any rank's
        # hooks is raised on every rank after the collectives
        error, self._error = self._take_error(self._error), None
        summaries = self._buffer.reduce(
            self._names,
            trainer.strategy.root_device,
            self._reducer(trainer),
            self._hist_now,
            self.bins,
            error=error,
            who=f"{type(self).__name__} (step {self._step}, rank {trainer.global_rank})",
            rank=trainer.global_rank,
        )
        self._write_guarded(trainer, lambda: self._write(trainer, summaries))
        self.cadence.finish_step()

    def _write(self, trainer: "pl.Trainer", summaries: dict[str, Summary]) -> None:
        step = self._step
        metrics: dict[str, float] = {}
        where = self._nonfinite_place(trainer, summaries)
        for name, s in summaries.items():
            tag = f"{self._prefix}/{name}"
            self._check_nonfinite(tag, s, where)
            if self._scalars_now:
                metrics.update(self._scalars(name, tag, s))
            if self._hist_now:
                self._log_histogram(trainer, tag, s, step)
        if self._scalars_now:
            self._log_scalars(trainer, metrics, step)
            self._health(summaries)
        if summaries:
            self._last = summaries
        if self._hist_now:
            self._last_hist_step = step
        if self._figure_now:
            self._log_figure(trainer, step)

    def _scalars(self, name: str, tag: str, s: Summary) -> dict[str, float]:
        return {f"{tag}/mean": s.mean, f"{tag}/std": s.std, **self._nonfinite_metric(tag, s)}

    def _health(self, summaries: dict[str, Summary]) -> None:
        pass

    def _nonfinite_place(self, trainer: "pl.Trainer", summaries: dict[str, Summary]) -> str:
        """Where NaN/inf appeared first this step: the first such module in call order, the step and rank."""
        bad = [n for n in summaries if summaries[n].nonfinite]
        if not bad:
            return ""
        first = min(bad, key=lambda n: summaries[n].order)
        order = "backward" if self._prefix == "activation_grad" else "forward"
        return (
            f"first at `{self._labels[first]}` (of {len(bad)} affected, in {order} order), step {self._step},"
            f" rank {summaries[first].nonfinite_rank}"
        )

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._eager.exit()

    def _remove_hooks(self) -> None:
        self._remove_handles()
        self._buffer.clear()
        self._recording = False

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._remove_hooks()
        self._hooks = []

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._remove_hooks()


class ActivationMonitor(_OutputMonitor):
    r"""Logs the forward outputs of selected modules: the lecture's activation statistics, on any model.

    For each selected module ``name`` (its qualified name in ``named_modules()``), on logged steps:

    - histogram ``activation/{name}`` (TensorBoard only);
    - scalars ``activation/{name}/mean``, ``/std``, ``/nonfinite`` (NaN/inf count, left out of the other statistics;
      logged from the first step that has any);
    - ``activation/{name}/saturation`` for bounded outputs (tanh, sigmoid, hardtanh, ...): the share
      with ``|y - center| > saturation_threshold * half_range``, i.e. ``|y| > 0.97`` for tanh and
      ``|2y - 1| > 0.97`` for sigmoid;
    - ``activation/{name}/dead`` for ReLU-like outputs: the share of units never positive in the batch,
      where a unit is a position over all dims but the first (the batch dim): a hidden feature of an
      MLP, a (channel, y, x) of a CNN, a (token, feature) of a Transformer. With several devices or
      micro-batches, it is the share over each device's micro-batch, pooled.

    A figure ``activation/distribution`` overlays every layer's histogram with a legend of mean, std
    and saturation (Images tab), and a summary table goes to the Text tab at the end of fit.
    Statistics are global across DDP ranks and pooled over the micro-batches of an accumulated step.
    A module called several times per forward pools all its calls.

    Args:
        modules: module types and/or ``fnmatch`` patterns of qualified names to watch, e.g.
            ``[nn.Tanh, "blocks.*.act"]``. Default: every activation module (Tanh, ReLU, GELU, SiLU,
            Sigmoid, LeakyReLU, ELU, Softplus, Mish, Hardtanh, ReLU6, ...).
        every_n_steps: log scalars every n optimizer steps; default ``Trainer(log_every_n_steps)``.
            ``0`` turns scalars off.
        histogram_every_n_steps: log histograms every n steps (and at the final step); default
            ``10 * every_n_steps``; ``0`` turns them off.
        figure_every_n_steps: the figure on the first histogram step (initialisation), every n steps (on
            histogram steps) and at the end of fit; default: about 5 over a fit of known length (else
            every ``2000 * every_n_steps``); ``0``: only the first and the end of fit.
        bins: histogram bins between the global min and max.
        saturation_threshold: share of the output range beyond which a bounded output is saturated.
        saturation_warning: warn once when a layer's saturation stays above this for 3 logged steps
            (calibrated on the lecture's runs: its healthy nets stay below 0.25, its naive init above 0.6).
        dead_warning: warn once when a layer's dead share stays above this for 3 logged steps.
        warn: emit health warnings (they are listed in the summary either way).

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        from callbacks import ActivationMonitor

        trainer = Trainer(logger=TensorBoardLogger("logs"), callbacks=[ActivationMonitor()])
    """

    _prefix = "activation"
    _figure_tag = "activation/distribution"
    _patience = 3
    _chart_titles: ClassVar[dict[tuple[str, str], tuple[str, int]]] = {
        ("activation/", "/saturation"): ("activation saturation: share near the bounds (tanh: |y| > 0.97)", 1),
        ("activation/", "/dead"): ("dead units: share never positive in the batch (ReLU-like)", 2),
        ("activation/", "/std"): ("activation std", 3),
    }

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        saturation_threshold: float = 0.97,
        saturation_warning: float = 0.4,
        dead_warning: float = 0.1,
        warn: bool = True,
    ) -> None:
        super().__init__(modules, every_n_steps, histogram_every_n_steps, figure_every_n_steps, bins, warn)
        self.saturation_threshold = _check_positive(saturation_threshold, "saturation_threshold", upper=1.0)
        self.saturation_warning = _check_positive(saturation_warning, "saturation_warning", upper=1.0)
        self.dead_warning = _check_positive(dead_warning, "dead_warning", upper=1.0)
        self._saturation: dict[str, tuple[float, float] | None] = {}
        self._relu_like: dict[str, bool] = {}
        self._norm_before: dict[str, str | None] = {}  # name -> the norm layer feeding it, for the advice

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        watched = set(self._names)
        self._norm_before = {
            tag_name(q): _norm_before(pl_module, q) for q, _ in pl_module.named_modules() if tag_name(q) in watched
        }

    def _make_hook(self, name: str, module: nn.Module) -> Any:
        sat = self._saturation[name] = saturation_spec(module, self.saturation_threshold)
        relu = self._relu_like[name] = is_relu_like(module)

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not self._recording:
                return
            t = _first_tensor(output)
            if t is not None:
                self._buffer.add(name, t, keep=self._hist_now, saturation=sat, relu_like=relu)

        return self._guard(hook)

    @override
    def _scalars(self, name: str, tag: str, s: Summary) -> dict[str, float]:
        out = super()._scalars(name, tag, s)
        if self._saturation.get(name) is not None and s.saturation is not None:
            out[f"{tag}/saturation"] = s.saturation
        if self._relu_like.get(name) and s.dead is not None:
            out[f"{tag}/dead"] = s.dead
        return out

    @override
    def _health(self, summaries: dict[str, Summary]) -> None:
        for name, s in summaries.items():
            if self._saturation.get(name) is not None and s.saturation is not None:
                norm = self._norm_before.get(name)
                advice = (
                    f" Its input is already normalised by `{norm}`: the norm's gain has grown, so lower the"
                    " learning rate (or weight-decay the norm's weight)."
                    if norm
                    else " Scale the weights of the layer before it down (e.g. gain / sqrt(fan_in), Kaiming),"
                    " or normalise its input (BatchNorm/LayerNorm)."
                )
                self._check(
                    f"saturation/{name}",
                    s.saturation > self.saturation_warning,
                    self._patience,
                    f"`{self._labels[name]}` is saturated: {s.saturation:.1%} of its outputs beyond"
                    f" {self.saturation_threshold} of the range (> {self.saturation_warning:.0%}), where its"
                    f" gradient is cut.{advice}",
                )
            if self._relu_like.get(name) and s.dead is not None:
                self._check(
                    f"dead/{name}",
                    s.dead > self.dead_warning,
                    self._patience,
                    f"`{self._labels[name]}` has {s.dead:.1%} dead units (never positive in a batch,"
                    f" > {self.dead_warning:.0%}): they get no gradient. Usually a too-high learning rate"
                    " pushed their biases negative; lower it, or check the init.",
                )

    def _legend(self, name: str, s: Summary) -> str:
        text = f"mean {s.mean:+.2f}, std {s.std:.2f}"
        if self._saturation.get(name) is not None and s.saturation is not None:
            text += f", saturated {s.saturation:.2%}"
        if self._relu_like.get(name) and s.dead is not None:
            text += f", dead {s.dead:.2%}"
        return text

    @override
    def _draw_figure(self) -> Any:
        from callbacks.figures import Distribution, plot_distributions

        data = {
            self._labels[n]: Distribution(s.edges, s.counts, self._legend(n, s))
            for n, s in self._last.items()
            if s.edges is not None and s.counts is not None
        }
        if not data:
            return None
        return plot_distributions(data, f"activation distribution (step {self._last_hist_step})")

    @override
    def _summary_rows(self) -> tuple[list[str], list[list[str]]]:
        rows = []
        for n, s in self._last.items():
            sat = f"{s.saturation:.2%}" if self._saturation.get(n) is not None and s.saturation is not None else ""
            dead = f"{s.dead:.2%}" if self._relu_like.get(n) and s.dead is not None else ""
            rows.append([self._labels[n], f"{s.mean:+.4f}", f"{s.std:.4f}", sat, dead])
        return ["layer", "mean", "std", "saturation", "dead"], rows


class GradientMonitor(_OutputMonitor):
    r"""Logs the gradients of the loss w.r.t. the outputs of selected modules (the lecture's ``out.grad``).

    For each selected module ``name``, on logged steps: histogram ``activation_grad/{name}`` and scalars
    ``activation_grad/{name}/std`` and ``/nonfinite`` (no mean: it is ~0 by construction); the figure
    ``activation_grad/distribution`` overlays every layer's histogram. Healthy layers have gradients of
    similar std; a layer whose std is far below the largest one (``vanishing_ratio``) for 3 logged steps
    is warned about once. The values are the gradients of the loss as Lightning back-propagates it:
    divided by ``accumulate_grad_batches``
    and, with 16-bit AMP, multiplied by the loss scale. Global across DDP ranks.

    Args:
        modules: module types and/or ``fnmatch`` name patterns; default: every activation module.
        every_n_steps: log scalars every n optimizer steps; default ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: first histogram step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        bins: histogram bins.
        vanishing_ratio: a layer whose gradient std is below this share of the largest layer's is
            "vanishing".
        warn: emit health warnings.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ActivationMonitor, GradientMonitor

        trainer = Trainer(callbacks=[ActivationMonitor(), GradientMonitor()])
    """

    _prefix = "activation_grad"
    _figure_tag = "activation_grad/distribution"
    _patience = 3
    _chart_titles: ClassVar[dict[tuple[str, str], tuple[str, int]]] = {
        ("activation_grad/", "/std"): ("activation gradient std (similar in every layer is healthy)", 4),
    }

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        vanishing_ratio: float = 1e-2,
        warn: bool = True,
    ) -> None:
        super().__init__(modules, every_n_steps, histogram_every_n_steps, figure_every_n_steps, bins, warn)
        self.vanishing_ratio = _check_positive(vanishing_ratio, "vanishing_ratio", upper=1.0)

    def _make_hook(self, name: str, module: nn.Module) -> Any:
        def grad_hook(grad: Tensor) -> None:
            self._buffer.add(name, grad, keep=self._hist_now)

        guarded_grad_hook = self._guard(grad_hook)

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None and t.requires_grad:
                t.register_hook(guarded_grad_hook)

        return self._guard(hook)

    @override
    def _scalars(self, name: str, tag: str, s: Summary) -> dict[str, float]:
        # no mean: the gradient w.r.t. an activation averages to ~0 by construction (noise around 1e-12)
        return {f"{tag}/std": s.std, **self._nonfinite_metric(tag, s)}

    @override
    def _health(self, summaries: dict[str, Summary]) -> None:
        stds = {n: s.std for n, s in summaries.items() if s.count > 0 and s.std == s.std}
        if not stds:
            return
        top = max(stds.values())
        for name, std in stds.items():
            bad = std == 0.0 or (len(stds) > 1 and std < self.vanishing_ratio * top)
            self._check(
                f"vanishing/{name}",
                bad,
                self._patience,
                f"gradients at `{self._labels[name]}` are vanishing: std {std:.2e} against {top:.2e} for the"
                " largest layer. Check for saturated activations or a too-small init before it.",
            )

    @override
    def _draw_figure(self) -> Any:
        from callbacks.figures import Distribution, plot_distributions

        data = {
            self._labels[n]: Distribution(s.edges, s.counts, f"std {s.std:.2e}")
            for n, s in self._last.items()
            if s.edges is not None and s.counts is not None
        }
        if not data:
            return None
        return plot_distributions(data, f"gradient distribution (step {self._last_hist_step})", xlabel="gradient")

    @override
    def _summary_rows(self) -> tuple[list[str], list[list[str]]]:
        rows = [[self._labels[n], f"{s.std:.3e}"] for n, s in self._last.items()]
        return ["layer", "grad std"], rows
