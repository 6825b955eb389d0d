"""What the four monitors share: cadence, loggers, writing, health warnings and the end-of-fit summary."""

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from callbacks._stats import Summary


def _check_steps(value: int | None, arg: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"Expected `{arg}` to be None or an int >= 0, but got {value!r}.")
    return value


def _check_positive(value: float, arg: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"Expected `{arg}` to be a positive number, but got {value!r}.")
    if upper is not None and value > upper:
        raise ValueError(f"Expected `{arg}` to be at most {upper}, but got {value!r}.")
    return float(value)


def _write_scalars(logger: TensorBoardLogger, metrics: Mapping[str, float], step: int) -> bool:
    """Writes scalars as one TensorBoard event: the values ``add_scalar`` would write one event each for.

    A logged step of the four monitors has some 15 scalars; one ``add_scalar`` costs about 40 us on a CPU
    here (proto, event, queue), one event holding all of them less than two. Returns False (nothing written)
    for a writer other than torch's ``SummaryWriter`` (tensorboardX has its own proto classes).
    """
    from torch.utils.tensorboard import SummaryWriter

    writer = logger.experiment
    if type(writer) is not SummaryWriter:
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in metrics.items()])
    writer._get_file_writer().add_summary(summary, step)
    return True


#: the training-step hooks after `on_train_batch_start`, which a monitor does not need between logged steps
STEP_HOOKS = (
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def shadow_step_hooks(callback: Callback, shadow: bool) -> None:
    """Shadows the callback's `STEP_HOOKS` by None on the instance (``shadow``), or restores its methods.

    Lightning calls a callback's hook only if it is callable, so a shadowed hook costs nothing on a step
    instead of a call inside a profiler context.
    """
    for hook in STEP_HOOKS:
        if shadow:
            callback.__dict__[hook] = None
        else:
            callback.__dict__.pop(hook, None)


class _Monitor(Callback):
    """Base class: decides on which steps to log and writes scalars, histograms, figures and text.

    Cadence (on Lightning's logging axis, ``trainer.fit_loop.epoch_loop._batches_that_stepped``, which
    is the optimizer step for one optimizer): scalars when ``(step + 1) % every_n_steps == 0``, exactly
    the steps on which Lightning writes ``self.log`` metrics; histograms every
    ``histogram_every_n_steps`` and at the final step; figures every ``figure_every_n_steps`` and at
    the end of fit. All micro-batches of an accumulated step belong to that step.
    """

    #: tag prefix of the figure and the summary text, e.g. "activation"
    _prefix: str = ""
    _figure_tag: str = ""

    def __init__(
        self,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        warn: bool = True,
    ) -> None:
        self.every_n_steps = _check_steps(every_n_steps, "every_n_steps")
        self.histogram_every_n_steps = _check_steps(histogram_every_n_steps, "histogram_every_n_steps")
        self.figure_every_n_steps = _check_steps(figure_every_n_steps, "figure_every_n_steps")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"Expected `bins` to be an int >= 1, but got {bins!r}.")
        if not isinstance(warn, bool):
            raise ValueError(f"Expected `warn` to be a bool, but got {warn!r}.")
        self.bins = bins
        self.warn = warn
        # resolved in `setup`
        self._n = self._hist_n = self._fig_n = 0
        self._final_step = 0
        self._has_tb = False
        # per-step flags, set in `on_train_batch_start`
        self._step = -1
        self._scalars_now = self._hist_now = self._figure_now = False
        # asleep between logged steps: `on_train_batch_start` returns at once before `_wake` (except on the
        # batches of `_awake_step`) and the other step hooks are shadowed by None (see `_set_asleep`)
        self._wake = -1
        self._awake_step = -1
        self._asleep = False
        # health bookkeeping (kept in the checkpoint)
        self._streaks: dict[str, int] = {}
        self._warned: dict[str, str] = {}
        self._nonfinite_warned = False
        self._nonfinite_tags: set[str] = set()
        # last logged values, for the end-of-fit summary and figure (small CPU data only)
        self._last: dict[str, Summary] = {}
        self._last_hist_step = -1
        self._last_figure_step = -1

    # ---------------------------------------------------------------- setup / cadence
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                f"Cannot use `{type(self).__name__}` callback with `Trainer(logger=False)`: it writes to the"
                " Trainer's loggers. Add one, e.g. `Trainer(logger=TensorBoardLogger('logs'))` for the"
                " histograms and figures, or `CSVLogger('logs')` for the scalars only."
            )
        self._n = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        self._hist_n = self.histogram_every_n_steps if self.histogram_every_n_steps is not None else 10 * self._n
        self._fig_n = self.figure_every_n_steps if self.figure_every_n_steps is not None else 2000 * self._n
        self._has_tb = any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)

    def _set_step_flags(self, trainer: "pl.Trainer", batch_idx: int) -> None:
        # Lightning's own logging axis: it logs `self.log` metrics when (this + 1) % n == 0
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self._step = step
        self._scalars_now = self._n > 0 and (step + 1) % self._n == 0
        self._hist_now = (
            self._has_tb
            and self._hist_n > 0
            and (
                (step + 1) % self._hist_n == 0
                or (step >= self._final_step - 1 and self._is_final_step(trainer, batch_idx))
            )
        )
        self._figure_now = self._hist_now and self._fig_n > 0 and (step + 1) % self._fig_n == 0

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step < self._wake and step != self._awake_step:
            self._reset_step_flags()
            self._set_asleep(True)
            return
        self._on_batch_start(trainer, pl_module, batch_idx)
        active = self._active
        self._set_asleep(not active)
        self._wake = self._next_active_step(step + 1)
        self._awake_step = step if active else -1  # all micro-batches of a logged step

    def _on_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> None:
        """The per-batch work of a step that may log: sets the step flags (subclasses add to it)."""
        self._set_step_flags(trainer, batch_idx)

    def _set_asleep(self, asleep: bool) -> None:
        if asleep != self._asleep:
            self._asleep = asleep
            shadow_step_hooks(self, asleep)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._wake = -1  # the plan below may change
        # a lower bound of the last optimizer step, so that `_is_final_step` runs only near the end
        self._final_step = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps >= 0 else -1
        n_batches, max_epochs = trainer.num_training_batches, trainer.max_epochs
        if isinstance(n_batches, int) and max_epochs is not None and max_epochs >= 0:
            per_epoch = -(-n_batches // trainer.accumulate_grad_batches)
            by_epochs = max_epochs * per_epoch
            self._final_step = by_epochs if self._final_step < 0 else min(self._final_step, by_epochs)
        if self._final_step < 0:
            self._final_step = 2**62  # open-ended: no final-step histogram

    def _next_active_step(self, step: int) -> int:
        """The first step >= ``step`` on which this monitor may log (a lower bound), for ``CallbackGroup``.

        Valid once ``on_train_epoch_start`` has run; until the returned step the monitor's training-step
        hooks have nothing to do and may be skipped.
        """
        candidates = [self._final_step - 1]
        if self._n > 0:
            candidates.append(step + (-(step + 1)) % self._n)
        if self._has_tb and self._hist_n > 0:
            candidates.append(step + (-(step + 1)) % self._hist_n)
        return max(step, min(candidates))

    @property
    def _active(self) -> bool:
        return self._scalars_now or self._hist_now

    def _reset_step_flags(self) -> None:
        self._scalars_now = self._hist_now = self._figure_now = False

    @staticmethod
    def _is_final_step(trainer: "pl.Trainer", batch_idx: int) -> bool:
        """Whether this batch belongs to the last optimizer step of the fit (as far as it is planned)."""
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if trainer.max_steps is not None and trainer.max_steps >= 0 and step + 1 >= trainer.max_steps:
            return True
        max_epochs = trainer.max_epochs
        n_batches = trainer.num_training_batches
        if max_epochs is None or max_epochs < 0 or not isinstance(n_batches, int) or n_batches <= 0:
            return False
        accumulate = trainer.accumulate_grad_batches
        last_group = (n_batches - 1) // accumulate
        return trainer.current_epoch + 1 >= max_epochs and batch_idx // accumulate >= last_group

    @staticmethod
    def _step_ends(trainer: "pl.Trainer") -> bool:
        """Whether the optimizer steps on this batch (the last micro-batch of an accumulation)."""
        epoch_loop = trainer.fit_loop.epoch_loop
        try:
            return not epoch_loop._should_accumulate()
        except AttributeError:  # pragma: no cover - private API moved
            return True

    @staticmethod
    def _reducer(trainer: "pl.Trainer") -> Callable[[Tensor, str], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        return lambda t, op: trainer.strategy.reduce(t, reduce_op=op)

    # ---------------------------------------------------------------- writing (rank zero)
    @staticmethod
    def _writers(trainer: "pl.Trainer") -> list[Any]:
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _log_scalars(self, trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        if not metrics or not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            if not (
                isinstance(lg, TensorBoardLogger)
                and not getattr(lg, "_prefix", "")
                and _write_scalars(lg, metrics, step)
            ):
                lg.log_metrics(dict(metrics), step=step)

    def _log_histogram(self, trainer: "pl.Trainer", tag: str, s: Summary, step: int) -> None:
        if s.edges is None or s.counts is None or s.count == 0 or not trainer.is_global_zero:
            return
        # TensorBoard reads right bucket limits; a leading empty bucket keeps the left edge
        limits, counts = s.edges, [0.0, *s.counts]
        for writer in self._writers(trainer):
            writer.add_histogram_raw(
                tag,
                min=s.min,
                max=s.max,
                num=s.count,
                sum=s.sum,
                sum_squares=s.sum_squares,
                bucket_limits=limits,
                bucket_counts=counts,
                global_step=step,
            )

    def _log_figure(self, trainer: "pl.Trainer", step: int) -> None:
        if not trainer.is_global_zero or not self._has_tb:
            return
        fig = self._draw_figure()
        if fig is None:
            return
        from callbacks.figures import figure_to_array

        self._last_figure_step = step
        image = figure_to_array(fig)
        for writer in self._writers(trainer):
            writer.add_image(self._figure_tag, image, global_step=step, dataformats="HWC")

    def _draw_figure(self) -> Any:
        """The figure of this monitor from its last data, or None."""
        return None

    # ---------------------------------------------------------------- health
    def _check(self, key: str, bad: bool, patience: int, message: str) -> None:
        """Warns once when ``bad`` held on ``patience`` consecutive logged steps."""
        if not bad:
            self._streaks.pop(key, None)
            return
        self._streaks[key] = streak = self._streaks.get(key, 0) + 1
        if streak >= patience and key not in self._warned:
            self._warned[key] = message
            if self.warn:
                rank_zero_warn(f"{type(self).__name__}: {message}")

    def _nonfinite_metric(self, tag: str, s: Summary) -> dict[str, float]:
        """``{tag}/nonfinite``, from the first step with NaN/inf on (so a healthy run has no such curve)."""
        if s.nonfinite:
            self._nonfinite_tags.add(tag)
        return {f"{tag}/nonfinite": float(s.nonfinite)} if tag in self._nonfinite_tags else {}

    def _check_nonfinite(self, tag: str, s: Summary) -> None:
        if s.nonfinite and not self._nonfinite_warned:
            self._nonfinite_warned = True
            rank_zero_warn(
                f"{type(self).__name__}: {s.nonfinite} non-finite values (NaN/inf) in `{tag}`; they are"
                f" counted in `{tag}/nonfinite` and left out of the statistics. Warned once."
            )

    # ---------------------------------------------------------------- end of fit
    def _summary_rows(self) -> list[str]:
        """Markdown table rows of the last logged values."""
        return []

    def _summary_text(self) -> str:
        lines = [f"**{type(self).__name__}**, last logged step {self._last_hist_step_or_step()}", ""]
        lines += self._summary_rows()
        lines += ["", "**Warnings**: " + ("none" if not self._warned else ""), ""]
        lines += [f"- {m}" for m in self._warned.values()]
        return "\n".join(lines)

    def _last_hist_step_or_step(self) -> int:
        return max(self._step, 0)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._set_asleep(False)
        self._wake = self._awake_step = -1

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._set_asleep(False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.is_global_zero or not self._has_tb:
            return
        step = trainer.global_step
        if self._last_hist_step >= 0 and self._last_figure_step != self._last_hist_step:
            self._log_figure(trainer, self._last_hist_step)
        text = self._summary_text()
        for writer in self._writers(trainer):
            writer.add_text(f"{self._prefix}/summary", text, global_step=step)

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": dict(self._warned), "streaks": dict(self._streaks)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = dict(state_dict.get("warned", {}))
        self._streaks = dict(state_dict.get("streaks", {}))
