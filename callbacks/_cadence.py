"""When a monitor logs, and when it may sleep: one cadence object, shared by the monitors and ``CallbackGroup``.

The step axis is Lightning's logging step, the x axis of ``self.log``: the optimizer step with automatic
optimization (``trainer.global_step``), the training batch with manual optimization (where ``global_step``
counts every optimizer's steps). On that axis, step ``s`` has

- scalars when ``(s + 1) % every_n_steps == 0`` (the steps on which Lightning writes ``self.log`` metrics);
- histograms when ``(s + 1) % histogram_every_n_steps == 0`` and at the final step of the fit;
- a figure on the first histogram step of the fit (the picture at initialisation), every
  ``figure_every_n_steps`` on histogram steps (by default about five over a fit of known length) and at
  the end of fit (drawn by the monitor from its last histograms).

All micro-batches of an accumulated step belong to that step. The final step is planned from ``max_steps``
and ``max_epochs``; with manual optimization the optimizer steps per batch are measured on the first
batches (exact when every batch takes the same optimizer steps, e.g. a GAN stepping both optimizers).
"""

import math

import lightning.pytorch as pl

from callbacks._internals import batch_axis

#: a step never reached: the fit is open-ended
OPEN = 2**62
#: figures over a fit of known length, by default (plus the first and the last)
FIGURES_PER_FIT = 5


def logging_step(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> int:
    """The current step on Lightning's logging axis (see the module docstring)."""
    if pl_module.automatic_optimization:
        return trainer.global_step
    return batch_axis(trainer)


def step_ends(trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> bool:
    """Whether the logging step ends with this batch: the last micro-batch of an accumulation, or any batch
    under manual optimization (public trainer state only)."""
    if not pl_module.automatic_optimization:
        return True
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or bool(trainer.is_last_batch)


class Alarm:
    """Sleep until a step: ``sleeping(step)`` until ``wake``, except on the batches of ``awake_step``."""

    def __init__(self) -> None:
        self.wake = -1
        self.awake_step = -1

    def sleeping(self, step: int) -> bool:
        return step < self.wake and step != self.awake_step

    def set(self, step: int, active: bool, wake: int) -> None:
        """After planning ``step``: stay awake for its other micro-batches when ``active``, sleep until ``wake``."""
        self.wake = wake
        self.awake_step = step if active else -1

    def reset(self) -> None:
        """Wake on the next batch (the plan may have changed: a new epoch, a validation, a resume)."""
        self.wake = self.awake_step = -1


class Cadence:
    """Decides on which steps a monitor logs scalars, histograms and figures, and until when it may sleep.

    Args:
        every_n_steps: scalars every n steps; None: ``Trainer(log_every_n_steps)``; 0: never.
        histogram_every_n_steps: None: ``10 * every_n_steps``; 0: never.
        figure_every_n_steps: None: about ``FIGURES_PER_FIT`` over a fit of known length, else every
            ``2000 * every_n_steps``; 0: only the first and the end of fit.
        histograms: False for a monitor without histograms (its figures then fall on scalar steps).

    Example::

        cadence = Cadence(every_n_steps=5, histogram_every_n_steps=50)
        cadence.setup(trainer, histograms=True)  # in the monitor's `setup`
        if cadence.on_batch_start(trainer, pl_module):  # False: asleep, nothing to do on this batch
            ...  # cadence.scalars, cadence.histograms, cadence.figure, cadence.step
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        histograms: bool = True,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.with_histograms = histograms
        # resolved in `setup` / `plan`
        self.n = self.hist_n = self.fig_n = 0
        self.last = OPEN  # the final step as planned (a lower bound while it is not known exactly)
        # the current step and what happens on it
        self.step = -1
        self.scalars = self.histograms = self.figure = False
        self.alarm = Alarm()
        self._first_figure = -1  # the step of the first figure of this fit
        self._origin: tuple[int, int] | None = None  # (logging step, global step) at the first batch of the fit
        self._rate: float | None = None  # optimizer steps per logging step

    @property
    def active(self) -> bool:
        """Whether the monitor logs anything on the current step."""
        return self.scalars or self.histograms

    def setup(self, trainer: "pl.Trainer", histograms: bool) -> None:
        """Resolves the defaults from the Trainer; ``histograms``: whether a logger can show them."""
        self.n = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        hist_n = self.histogram_every_n_steps if self.histogram_every_n_steps is not None else 10 * self.n
        self.hist_n = hist_n if histograms and self.with_histograms else 0
        self.fig_n = self.figure_every_n_steps if self.figure_every_n_steps is not None else 2000 * self.n
        self.step, self.last, self._first_figure, self._origin, self._rate = -1, OPEN, -1, None, None
        self.reset()

    def reset(self) -> None:
        self.scalars = self.histograms = self.figure = False
        self.alarm.reset()

    def plan(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        """Plans the final step from ``max_steps`` / ``max_epochs`` (and the default figure cadence)."""
        last = OPEN
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            # automatic optimization: one optimizer step a step (it supports one optimizer); manual: measured,
            # and before that the most a batch can take (every optimizer steps once)
            rate = 1.0 if pl_module.automatic_optimization else self._rate or max(len(trainer.optimizers), 1)
            remaining = max(math.ceil((trainer.max_steps - trainer.global_step) / rate - 1e-9), 1)
            last = step + remaining - 1
        n_batches, max_epochs = trainer.num_training_batches, trainer.max_epochs
        if isinstance(n_batches, int) and n_batches > 0 and max_epochs is not None and max_epochs >= 0:
            accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            last = min(last, max_epochs * -(-n_batches // accumulate) - 1)
        self.last = last
        if self.figure_every_n_steps is None and last < OPEN:
            base = self.hist_n or self.n
            if base > 0:
                self.fig_n = base * max(1, math.ceil((last + 1) // base / FIGURES_PER_FIT))

    def on_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> bool:
        """Sets the current step's flags; False when asleep (then nothing is logged on this batch)."""
        step = logging_step(trainer, pl_module)
        if self.alarm.sleeping(step):
            self.scalars = self.histograms = self.figure = False
            return False
        if step != self.step:
            self._observe(trainer, pl_module, step)
        self.step = step
        self.scalars = self.n > 0 and (step + 1) % self.n == 0
        self.histograms = self.hist_n > 0 and ((step + 1) % self.hist_n == 0 or step >= self.last)
        figure_steps = self.histograms if self.hist_n > 0 else self.scalars and not self.with_histograms
        self.figure = figure_steps and (
            self._first_figure in (-1, step) or (self.fig_n > 0 and (step + 1) % self.fig_n == 0)
        )
        if self.figure and self._first_figure < 0:
            self._first_figure = step
        self.alarm.set(step, self.active, self.next_active_step(step + 1))
        return True

    def _observe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int) -> None:
        if not pl_module.automatic_optimization:  # measure the optimizer steps per batch
            if self._origin is None:
                self._origin = (step, trainer.global_step)
            elif step > self._origin[0]:
                self._rate = (trainer.global_step - self._origin[1]) / (step - self._origin[0]) or None
        self.plan(trainer, pl_module, step)

    def next_active_step(self, step: int) -> int:
        """The first step >= ``step`` on which the monitor may log (a lower bound): it may sleep until then.

        Public for ``CallbackGroup``, which sleeps until the first of its members' next steps.
        """
        candidates = [self.last]
        if self._origin is not None and self._rate is None:
            candidates.append(self._origin[0] + 1)  # manual optimization: measure the steps per batch
        if self.n > 0:
            candidates.append(step + (-(step + 1)) % self.n)
        if self.hist_n > 0:
            candidates.append(step + (-(step + 1)) % self.hist_n)
        return max(step, min(candidates))

    def finish_step(self) -> None:
        """The current step is written: its remaining hooks (if any) have nothing to do."""
        self.scalars = self.histograms = self.figure = False
