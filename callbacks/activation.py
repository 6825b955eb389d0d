"""Forward activations and their gradients, per selected module: ``ActivationMonitor``, ``GradientMonitor``.

Both select their modules in ``on_fit_start`` and register a forward hook on each of them for the
training batches of logged steps only (removed after the step). The hook adds the output's statistics
(computed on its device) to a per-step buffer, which is reduced across ranks and written after the
optimizer step. ``GradientMonitor`` registers a tensor hook on the output in that forward hook, so
it sees ``dL/d output`` during backward without ``retain_grad``.
"""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from callbacks._base import _check_positive, _Monitor
from callbacks._selection import ModuleSpec, check_specs, is_relu_like, saturation_spec, select_modules
from callbacks._stats import StatsBuffer, Summary


def _first_tensor(output: Any) -> Tensor | None:
    """The module's output tensor, or the first floating-point tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
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
        self._state_key: str | None = None
        self._names: list[str] = []
        self._labels: dict[str, str] = {}  # name -> "name (Tanh)"
        self._hooks: list[tuple[nn.Module, Any]] = []  # (module, forward hook), registered on logged steps only
        self._handles: list[RemovableHandle] = []
        self._buffer = StatsBuffer()
        self._recording = False

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this on every hook call: compute it once
        if self._state_key is None:
            self._state_key = self._generate_state_key(modules=[getattr(m, "__name__", m) for m in self.modules or ()])
        return self._state_key

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._names = []
        self._hooks = []
        for name, module in select_modules(pl_module, self.modules):
            self._names.append(name)
            self._labels[name] = f"{name} ({type(module).__name__})"
            self._hooks.append((module, self._make_hook(name, module)))
        if not self._names:
            rank_zero_warn(
                f"{type(self).__name__} found no module to watch in {type(pl_module).__name__}: pass"
                " `modules=[nn.SomeType, 'some.name.*']` to choose some."
            )

    def _make_hook(self, name: str, module: nn.Module) -> Any:
        raise NotImplementedError

    @override
    def _on_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step != self._step:
            self._buffer.clear()  # leftovers of an interrupted step
        self._set_step_flags(trainer, batch_idx)
        self._recording = self._active and bool(self._names)
        if self._recording and not self._handles:
            # hooks exist only during logged steps: a module with a forward hook takes nn.Module's slow call path
            self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]

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
        if not self._active or not self._names or not self._step_ends(trainer):
            return
        self._remove_handles()
        # every rank reduces the same names, even those its own forward never reached
        summaries = self._buffer.reduce(
            self._names, trainer.strategy.root_device, self._reducer(trainer), self._hist_now, self.bins
        )
        self._write(trainer, summaries)
        self._reset_step_flags()

    def _write(self, trainer: "pl.Trainer", summaries: dict[str, Summary]) -> None:
        step = self._step
        metrics: dict[str, float] = {}
        for name, s in summaries.items():
            tag = f"{self._prefix}/{name}"
            self._check_nonfinite(tag, s)
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

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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
        figure_every_n_steps: log the figure every n steps (must fall on a histogram step) and at the
            end of fit; default ``2000 * every_n_steps``; ``0``: only at the end of fit.
        bins: histogram bins between the global min and max.
        saturation_threshold: share of the output range beyond which a bounded output is saturated.
        saturation_warning: warn once when a layer's saturation stays above this for 3 logged steps.
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

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        saturation_threshold: float = 0.97,
        saturation_warning: float = 0.05,
        dead_warning: float = 0.1,
        warn: bool = True,
    ) -> None:
        super().__init__(modules, every_n_steps, histogram_every_n_steps, figure_every_n_steps, bins, warn)
        self.saturation_threshold = _check_positive(saturation_threshold, "saturation_threshold", upper=1.0)
        self.saturation_warning = _check_positive(saturation_warning, "saturation_warning", upper=1.0)
        self.dead_warning = _check_positive(dead_warning, "dead_warning", upper=1.0)
        self._saturation: dict[str, tuple[float, float] | None] = {}
        self._relu_like: dict[str, bool] = {}

    def _make_hook(self, name: str, module: nn.Module) -> Any:
        sat = self._saturation[name] = saturation_spec(module, self.saturation_threshold)
        relu = self._relu_like[name] = is_relu_like(module)

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not self._recording:
                return
            t = _first_tensor(output)
            if t is not None:
                self._buffer.add(name, t, keep=self._hist_now, saturation=sat, relu_like=relu)

        return hook

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
                self._check(
                    f"saturation/{name}",
                    s.saturation > self.saturation_warning,
                    self._patience,
                    f"`{self._labels[name]}` is saturated: {s.saturation:.1%} of its outputs beyond"
                    f" {self.saturation_threshold} of the range (> {self.saturation_warning:.0%}). Scale the"
                    " layer before it down, or normalise its input (BatchNorm/LayerNorm).",
                )
            if self._relu_like.get(name) and s.dead is not None:
                self._check(
                    f"dead/{name}",
                    s.dead > self.dead_warning,
                    self._patience,
                    f"`{self._labels[name]}` has {s.dead:.1%} dead units (never positive in a batch,"
                    f" > {self.dead_warning:.0%}). Lower the learning rate or check the init.",
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
    def _summary_rows(self) -> list[str]:
        rows = ["| layer | mean | std | saturation | dead |", "|---|---|---|---|---|"]
        for n, s in self._last.items():
            sat = f"{s.saturation:.2%}" if self._saturation.get(n) is not None and s.saturation is not None else ""
            dead = f"{s.dead:.2%}" if self._relu_like.get(n) and s.dead is not None else ""
            rows.append(f"| {self._labels[n]} | {s.mean:+.4f} | {s.std:.4f} | {sat} | {dead} |")
        return rows


class GradientMonitor(_OutputMonitor):
    r"""Logs the gradients of the loss w.r.t. the outputs of selected modules (the lecture's ``out.grad``).

    For each selected module ``name``, on logged steps: histogram ``activation_grad/{name}`` and scalars
    ``activation_grad/{name}/mean``, ``/std``, ``/nonfinite``; the figure ``activation_grad/distribution``
    overlays every layer's histogram. Healthy layers have gradients of similar std; a layer whose std is
    far below the largest one (``vanishing_ratio``) for 3 logged steps is warned about once. The values
    are the gradients of the loss as Lightning back-propagates it: divided by ``accumulate_grad_batches``
    and, with 16-bit AMP, multiplied by the loss scale. Global across DDP ranks.

    Args:
        modules: module types and/or ``fnmatch`` name patterns; default: every activation module.
        every_n_steps: log scalars every n optimizer steps; default ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: default ``2000 * every_n_steps``; ``0``: only at the end of fit.
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
            if self._recording:
                self._buffer.add(name, grad, keep=self._hist_now)

        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            if not self._recording:
                return
            t = _first_tensor(output)
            if t is not None and t.requires_grad:
                t.register_hook(grad_hook)

        return hook

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
            self._labels[n]: Distribution(s.edges, s.counts, f"mean {s.mean:+.2e}, std {s.std:.2e}")
            for n, s in self._last.items()
            if s.edges is not None and s.counts is not None
        }
        if not data:
            return None
        return plot_distributions(data, f"gradient distribution (step {self._last_hist_step})", xlabel="gradient")

    @override
    def _summary_rows(self) -> list[str]:
        rows = ["| layer | grad mean | grad std |", "|---|---|---|"]
        rows += [f"| {self._labels[n]} | {s.mean:+.3e} | {s.std:.3e} |" for n, s in self._last.items()]
        return rows
