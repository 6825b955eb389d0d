"""When a probe records: one pure function of the step and the fit's plan.

The step axis is Lightning's logging step, the x axis of ``self.log``: the optimizer step with automatic
optimization (``trainer.global_step``), the training batch with manual optimization (where ``global_step``
counts every optimizer's steps). All micro-batches of an accumulated step belong to that step. On that axis,
with a probe's :class:`Schedule`, step ``s`` of a fit planned as :class:`Plan` ``(first, last)`` has

- scalars when ``(s + 1) % n == 0`` (the steps on which Lightning writes ``self.log`` metrics), and on step 0
  of a fit that starts from scratch (the picture at initialisation, before any update);
- histograms when ``(s + 1) % hist_n == 0``, on step 0 of a fresh fit, and at the final step;
- a figure on the fit's first histogram step (step 0 of a fresh fit), every ``fig_n`` steps among histogram
  steps (by default about :data:`FIGURES_PER_FIT` over a fit of known length), and at the end of fit (drawn from
  the last histograms recorded, whatever the data source). A probe without histograms has its figures on its
  scalar steps.
"""

import math
from dataclasses import dataclass

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


def _check_steps(value: int | None, arg: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"Expected `{arg}` to be None or an int >= 0, but got {value!r}.")
    return value


@dataclass(frozen=True)
class Plan:
    """The fit as known at a step: its first step (0 for a fresh fit) and its final step (:data:`OPEN`: unknown)."""

    first: int = 0
    last: int = OPEN

    @property
    def fresh(self) -> bool:
        return self.first == 0


@dataclass(frozen=True)
class Moment:
    """What a probe records on one step."""

    scalars: bool = False
    histograms: bool = False
    figure: bool = False

    @property
    def active(self) -> bool:
        return self.scalars or self.histograms


IDLE = Moment()


@dataclass(frozen=True)
class Schedule:
    """A probe's cadence resolved against the Trainer: scalars every ``n``, histograms every ``hist_n`` (0: never),
    figures every ``fig_n`` (None: about :data:`FIGURES_PER_FIT` over a fit of known length), drawn from the
    histograms (``from_histograms``; none without them) or on scalar steps."""

    n: int
    hist_n: int
    fig_n: int | None
    from_histograms: bool = True

    def figure_every(self, plan: Plan) -> int:
        if self.fig_n is not None:
            return self.fig_n
        base = self.hist_n or self.n
        if plan.last >= OPEN or base <= 0:
            return 2000 * self.n
        return base * max(1, math.ceil((plan.last + 1) // base / FIGURES_PER_FIT))

    def _hist_step(self, step: int, plan: Plan) -> bool:
        return self.hist_n > 0 and ((step + 1) % self.hist_n == 0 or step >= plan.last or step == 0)

    def first_figure(self, plan: Plan) -> int:
        """The fit's first figure step: its first histogram step (its first scalar step without histograms)."""
        if plan.fresh:
            return 0
        every = self.hist_n if self.from_histograms else self.n
        if every <= 0:
            return plan.last
        return min(plan.first + (-(plan.first + 1)) % every, plan.last)

    def moment(self, step: int, plan: Plan) -> Moment:
        """What is recorded on ``step``: a pure function of the step and the plan."""
        start = step == 0  # the picture at initialisation, before any update
        scalars = self.n > 0 and ((step + 1) % self.n == 0 or start)
        histograms = self._hist_step(step, plan)
        on = histograms if self.from_histograms else scalars
        every = self.figure_every(plan)
        figure = on and (step == self.first_figure(plan) or (every > 0 and (step + 1) % every == 0))
        return Moment(scalars, histograms, figure)

    def next_step(self, step: int, plan: Plan) -> int:
        """The first step >= ``step`` that may record (a lower bound): nothing is recorded before it."""
        candidates = [plan.last]
        if step == 0:
            candidates.append(0)
        if self.n > 0:
            candidates.append(step + (-(step + 1)) % self.n)
        if self.hist_n > 0:
            candidates.append(step + (-(step + 1)) % self.hist_n)
        return max(step, min(candidates))


@dataclass(frozen=True)
class Cadence:
    """When a probe records, as the user asked; :meth:`resolve` fills the defaults from the Trainer.

    Args:
        every_n_steps: scalars every n steps; None: ``Trainer(log_every_n_steps)``; 0: never.
        histogram_every_n_steps: None: ``10 * every_n_steps``; 0: never.
        figure_every_n_steps: None: about ``FIGURES_PER_FIT`` over a fit of known length, else every
            ``2000 * every_n_steps``; 0: only the first and the end of fit.
    """

    every_n_steps: int | None = None
    histogram_every_n_steps: int | None = None
    figure_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        _check_steps(self.every_n_steps, "every_n_steps")
        _check_steps(self.histogram_every_n_steps, "histogram_every_n_steps")
        _check_steps(self.figure_every_n_steps, "figure_every_n_steps")

    def resolve(self, log_every_n_steps: int, histograms: bool, from_histograms: bool = True) -> Schedule:
        """The schedule under a Trainer logging every ``log_every_n_steps``.

        ``histograms``: whether they are recorded (a probe that has them, and a logger or figure that shows them);
        ``from_histograms``: whether the probe's figure is drawn from its histograms (else on scalar steps).
        """
        n = self.every_n_steps if self.every_n_steps is not None else log_every_n_steps
        hist_n = self.histogram_every_n_steps if self.histogram_every_n_steps is not None else 10 * n
        return Schedule(n, hist_n if histograms else 0, self.figure_every_n_steps, from_histograms)


def plan_fit(trainer: "pl.Trainer", pl_module: "pl.LightningModule", first: int, step: int, rate: float | None) -> Plan:
    """The fit's :class:`Plan` at ``step``, from ``max_steps`` and ``max_epochs``.

    ``rate``: optimizer steps per logging step, measured under manual optimization (None until measured: every
    optimizer stepping once a batch is assumed, the most a batch can take). One with automatic optimization.
    """
    last = OPEN
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        rate = 1.0 if pl_module.automatic_optimization else rate or max(len(trainer.optimizers), 1)
        remaining = max(math.ceil((trainer.max_steps - trainer.global_step) / rate - 1e-9), 1)
        last = step + remaining - 1
    n_batches, max_epochs = trainer.num_training_batches, trainer.max_epochs
    if isinstance(n_batches, int) and n_batches > 0 and max_epochs is not None and max_epochs >= 0:
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        last = min(last, max_epochs * -(-n_batches // accumulate) - 1)
    return Plan(first, last)
