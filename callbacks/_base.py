"""What the four monitors share: cadence, loggers, writing, health warnings and the end-of-fit summary."""

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from callbacks._cadence import Cadence, step_ends
from callbacks._internals import shadow_step_hooks
from callbacks._stats import Summary
from callbacks._warnings import health_warning
from callbacks._writers import LOSS_CHART, Chart, Writer, writers_for


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


class _Monitor(Callback):
    """Base class: decides on which steps to log (a :class:`Cadence`) and writes scalars, histograms, figures, text.

    The cadence (see ``callbacks._cadence``): scalars every ``every_n_steps`` on Lightning's logging axis,
    histograms every ``histogram_every_n_steps`` and at the final step, figures on the first histogram step,
    every ``figure_every_n_steps`` and at the end of fit. All micro-batches of an accumulated step belong to
    that step. Between its logged steps a monitor sleeps: ``on_train_batch_start`` returns at once and the
    other step hooks are shadowed (``callbacks._internals``, the one place that touches Lightning's privates).
    """

    #: tag prefix of the figure and the summary text, e.g. "activation"
    _prefix: str = ""
    _figure_tag: str = ""
    #: whether this monitor writes histograms (its figures fall on scalar steps otherwise)
    _histograms: bool = True

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
        #: when this monitor logs; public so that a dispatcher (``CallbackGroup``) can ask when it next logs
        self.cadence = Cadence(every_n_steps, histogram_every_n_steps, figure_every_n_steps, self._histograms)
        self._has_tb = False  # resolved in `setup`
        self._asleep = False  # step hooks shadowed (see `_set_asleep`)
        self._pending_error: BaseException | None = None  # a write that failed on this rank (see `_write_guarded`)
        self._state_key: str | None = None
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
    def _state_key_args(self) -> dict[str, Any]:
        """What tells two instances of this monitor apart in a checkpoint (see ``state_key``)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this on every hook call: compute it once (the arguments are fixed)
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_args())
        return self._state_key

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
        # histograms are binned when some logger shows them or the figures drawn from them
        self._has_tb = any(w.histograms or w.figures for w in writers_for(trainer.loggers))
        self.cadence.setup(trainer, histograms=self._has_tb)

    # the current step and what happens on it (read-only views of the cadence)
    @property
    def _step(self) -> int:
        return self.cadence.step

    @property
    def _scalars_now(self) -> bool:
        return self.cadence.scalars

    @property
    def _hist_now(self) -> bool:
        return self.cadence.histograms

    @property
    def _figure_now(self) -> bool:
        return self.cadence.figure

    @property
    def _active(self) -> bool:
        return self.cadence.active

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        previous = self.cadence.step
        awake = self.cadence.on_batch_start(trainer, pl_module)
        if awake:
            self._on_batch_start(trainer, pl_module, batch_idx, new_step=self.cadence.step != previous)
        self._set_asleep(not self.cadence.active)

    def _on_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int, new_step: bool
    ) -> None:
        """The per-batch work of a step that may log, once the cadence is set (subclasses add to it)."""

    def _set_asleep(self, asleep: bool) -> None:
        if asleep != self._asleep:
            self._asleep = asleep
            shadow_step_hooks(self, asleep)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.cadence.reset()  # wake on the next batch: the plan may change

    @staticmethod
    def _step_ends(trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> bool:
        """Whether the logging step ends with this batch (the last micro-batch of an accumulation)."""
        return step_ends(trainer, pl_module, batch_idx)

    def _write_guarded(self, trainer: "pl.Trainer", write: Callable[[], None]) -> None:
        """Runs the writing of a reduced step. With several processes an error (rank zero writes, e.g. a logger's
        network or disk) is kept instead of raised: the next reduce carries it to every rank, which all raise it;
        raised here, on one rank, it would leave the others waiting in their next collective."""
        if trainer.world_size <= 1:
            write()
            return
        try:
            write()
        except Exception as error:  # raised on every rank by the next `StatsBuffer.reduce`
            self._pending_error = self._pending_error or error

    def _take_error(self, error: BaseException | None) -> BaseException | None:
        """``error``, or the write error kept since the last reduce (then forgotten)."""
        pending, self._pending_error = self._pending_error, None
        return error or pending

    @staticmethod
    def _reducer(trainer: "pl.Trainer") -> Callable[[Tensor, str], Tensor] | None:
        if trainer.world_size <= 1:
            return None
        return lambda t, op: trainer.strategy.reduce(t, reduce_op=op)

    # ---------------------------------------------------------------- writing (rank zero)
    #: the dashboard chart of each kind of scalar: (tag prefix, tag suffix) -> (chart title, place on the dashboard)
    _chart_titles: ClassVar[dict[tuple[str, str], tuple[str, int]]] = {}
    #: the tags already put on a chart, and for which writers (instance attributes from the first logged step)
    _charted: frozenset[str] = frozenset()
    _charted_for: tuple[int, ...] = ()

    @staticmethod
    def _writers(trainer: "pl.Trainer") -> list[Writer]:
        """One writer per logger of the Trainer (see ``callbacks._writers``), shared with the other monitors."""
        return writers_for(trainer.loggers)

    def _charts(self, tags: list[str]) -> list[Chart]:
        """The dashboard charts of ``tags`` (in their order: forward order), plus the loss chart."""
        # every metric named like a loss: `train/loss`, `val/loss`, `train_loss_epoch` (the plugin uses re.match)
        charts: dict[str, Chart] = {LOSS_CHART: Chart(LOSS_CHART, 0, [r"(.*[/_])?loss([/_].*)?$"], regex=True)}
        for tag in tags:
            for (prefix, suffix), (title, order) in self._chart_titles.items():
                if tag.startswith(prefix) and tag.endswith(suffix) and "/nonfinite" not in tag:
                    charts.setdefault(title, Chart(title, order)).tags.append(tag)
                    break
        return list(charts.values())

    def _log_scalars(self, trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        if not metrics or not trainer.is_global_zero:
            return
        writers = self._writers(trainer)
        for writer in writers:
            writer.scalars(metrics, step)
        key = tuple(id(w) for w in writers)
        if key != self._charted_for:  # another fit, other loggers: their layouts start empty
            self._charted, self._charted_for = frozenset(), key
        new = [tag for tag in metrics if tag not in self._charted]
        if new:  # the layout grows (first logged step, a late `/nonfinite`): each writer rewrites its own
            self._charted = self._charted | set(new)
            charts = self._charts(list(metrics))
            for writer in writers:
                writer.charts(charts, step)

    def _log_histogram(self, trainer: "pl.Trainer", tag: str, s: Summary, step: int) -> None:
        if s.edges is None or s.counts is None or s.count == 0 or not trainer.is_global_zero:
            return
        for writer in self._writers(trainer):
            if writer.histograms:
                writer.histogram(tag, s, step)

    def _log_figure(self, trainer: "pl.Trainer", step: int) -> None:
        if not trainer.is_global_zero:
            return
        writers = [w for w in self._writers(trainer) if w.figures]
        if not writers:
            return
        fig = self._draw_figure()
        if fig is None:
            return
        from callbacks.figures import figure_to_array

        self._last_figure_step = step
        image = figure_to_array(fig)  # (H, W, 3) uint8
        for writer in writers:
            writer.figure(self._figure_tag, image, step)

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
                health_warning(f"{type(self).__name__}: {message}")

    def _nonfinite_metric(self, tag: str, s: Summary) -> dict[str, float]:
        """``{tag}/nonfinite``, from the first step with NaN/inf on (so a healthy run has no such curve)."""
        if s.nonfinite:
            self._nonfinite_tags.add(tag)
        return {f"{tag}/nonfinite": float(s.nonfinite)} if tag in self._nonfinite_tags else {}

    def _check_nonfinite(self, tag: str, s: Summary, where: str = "") -> None:
        # `where`: the place NaN/inf appeared first (module or parameter, step, rank), from the monitor
        if s.nonfinite and not self._nonfinite_warned:
            self._nonfinite_warned = True
            health_warning(
                f"{type(self).__name__}: {s.nonfinite} non-finite values (NaN/inf) in `{tag}`"
                f"{' (' + where + ')' if where else ''}; they are"
                f" counted in `{tag}/nonfinite` and left out of the statistics. Warned once."
            )

    # ---------------------------------------------------------------- end of fit
    def _summary_rows(self) -> tuple[list[str], list[list[str]]]:
        """The end-of-fit table of the last logged values: (column names, rows of formatted cells)."""
        return [], []

    def _summary_text(self) -> str:
        """The end-of-fit summary as markdown: the table of :meth:`_summary_rows`, then the warnings raised."""
        columns, rows = self._summary_rows()
        lines = [f"**{type(self).__name__}**, last logged step {self._last_hist_step_or_step()}", ""]
        if columns:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "**Warnings**: " + ("none" if not self._warned else ""), ""]
        lines += [f"- {m}" for m in self._warned.values()]
        return "\n".join(lines)

    def _last_hist_step_or_step(self) -> int:
        return max(self._step, 0)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._set_asleep(False)
        self.cadence.reset()
        pending, self._pending_error = self._pending_error, None
        if pending is not None and stage == "fit":
            raise pending  # a write of the last logged step failed: no reduce came after it

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
        columns, rows = self._summary_rows()
        text = self._summary_text()
        for writer in self._writers(trainer):
            writer.summary(f"{self._prefix}/summary", columns, rows, text, step)

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"warned": dict(self._warned), "streaks": dict(self._streaks)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warned = dict(state_dict.get("warned", {}))
        self._streaks = dict(state_dict.get("streaks", {}))
