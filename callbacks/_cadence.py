"""When a probe records: one pure function of the step, :meth:`Cadence.moment`.

The step axis is Lightning's logging step, the x axis of ``self.log``: the optimizer step with automatic
optimization (``trainer.global_step``), the training batch with manual optimization (where ``global_step``
counts every optimizer's steps). All micro-batches of an accumulated step belong to that step. On that axis,
with a probe's :class:`Cadence` resolved against the Trainer (``n``, ``hist_n``, ``fig_n``: its three fields),
step ``s`` of a fit whose first step is ``first`` (0: a fresh fit) and last step ``last`` has

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


def last_step(trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int, rate: float | None) -> int:
    """The fit's last logging step as known at ``step``, from ``max_steps`` and ``max_epochs`` (:data:`OPEN`: none).

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
    return last


@dataclass(frozen=True)
class Moment:
    """What a probe records on one step."""

    scalars: bool = False
    histograms: bool = False
    figure: bool = False

    @property
    def active(self) -> bool:
        return self.scalars or self.histograms


def _check_steps(value: int | None, arg: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"Expected `{arg}` to be None or an int >= 0, but got {value!r}.")


@dataclass(frozen=True)
class Cadence:
    """When a probe records, as the user asked; :meth:`resolve` fills the defaults from the Trainer.

    Args:
        every_n_steps: scalars every n steps; None: ``Trainer(log_every_n_steps)``; 0: never.
        histogram_every_n_steps: None: ``10 * every_n_steps``; 0: never.
        figure_every_n_steps: None: about ``FIGURES_PER_FIT`` over a fit of known length, else every
            ``2000 * every_n_steps``; 0: only the first and the end of fit.

    Raises:
        ValueError: for an argument that is not None or an int >= 0.
    """

    every_n_steps: int | None = None
    histogram_every_n_steps: int | None = None
    figure_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        _check_steps(self.every_n_steps, "every_n_steps")
        _check_steps(self.histogram_every_n_steps, "histogram_every_n_steps")
        _check_steps(self.figure_every_n_steps, "figure_every_n_steps")

    def resolve(self, log_every_n_steps: int, histograms: bool) -> "Cadence":
        """This cadence under a Trainer logging every ``log_every_n_steps``, with ``every_n_steps`` and
        ``histogram_every_n_steps`` filled (0 when ``histograms`` are not recorded: a probe without them, or no
        logger or figure to show them). ``figure_every_n_steps`` stays None for the default: it depends on the
        fit's length, known step by step."""
        n = self.every_n_steps if self.every_n_steps is not None else log_every_n_steps
        hist_n = self.histogram_every_n_steps if self.histogram_every_n_steps is not None else 10 * n
        return Cadence(n, hist_n if histograms else 0, self.figure_every_n_steps)

    def moment(self, step: int, first: int, last: int, from_histograms: bool = True) -> Moment:
        """What this resolved cadence records on ``step`` of a fit from step ``first`` to step ``last`` (see the
        module docstring). ``from_histograms``: the probe's figures are drawn from its histograms (else on its
        scalar steps)."""
        n, hist_n, fig_n = self.every_n_steps, self.histogram_every_n_steps, self.figure_every_n_steps
        assert n is not None and hist_n is not None, "resolve the cadence first (`Cadence.resolve`)"
        scalars = n > 0 and (step == 0 or (step + 1) % n == 0)  # step 0: the picture at initialisation
        histograms = hist_n > 0 and (step == 0 or step >= last or (step + 1) % hist_n == 0)
        if not (histograms if from_histograms else scalars):
            return Moment(scalars, histograms, False)  # a figure is drawn on a histogram step, or a scalar step
        series = hist_n if from_histograms else n  # > 0 here
        first_figure = 0 if first == 0 else min(first + (-(first + 1)) % series, last)
        if fig_n is None:  # about FIGURES_PER_FIT over a fit of known length
            fig_n = 2000 * n if last >= OPEN else series * max(1, math.ceil((last + 1) // series / FIGURES_PER_FIT))
        figure = step == first_figure or (fig_n > 0 and (step + 1) % fig_n == 0)
        return Moment(scalars, histograms, figure)

    def next_step(self, step: int, last: int) -> int:
        """The first step >= ``step`` on which this resolved cadence may record (a lower bound), in a fit whose last
        step is ``last``: nothing is recorded before it."""
        candidates = [last, *([0] if step == 0 else [])]
        for every in (self.every_n_steps, self.histogram_every_n_steps):
            if every:
                candidates.append(step + (-(step + 1)) % every)
        return max(step, min(candidates))
