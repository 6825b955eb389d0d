"""What the classification loss is given: logits, log-probabilities, or (by mistake) probabilities.

``F.cross_entropy`` (and ``nn.CrossEntropyLoss``) applies log-softmax itself: it wants *logits*. A softmax before it
is one of the commonest silent bugs (the fault studies' "softmax before the cross-entropy"): nothing raises, the loss
goes down a little, and the model ends far worse than it should, because the loss sees ``softmax(softmax(z))``,
whose values lie within 1 of each other: with ``C`` classes the loss cannot go below ``ln(e + C - 1) - 1``
(2.36 for 27 characters, against 0 for a perfect model) and its gradient is squashed. ``F.nll_loss`` is the
opposite: it wants *log-probabilities* (``log_softmax`` first); given probabilities or logits it returns
``-x[target]``, which the model can push down without bound.

The probe sees every call of those two functions in the training step, whoever makes it (``F.cross_entropy``,
``nn.CrossEntropyLoss``, a ``from torch.nn.functional import cross_entropy``), through a ``TorchFunctionMode`` that is
on during the first :data:`CHECKED_STEPS` steps it records, from the start of the step until its loss is computed
(Lightning's ``on_before_backward``: the first micro-batch's forward, with gradient accumulation), and counts
the input rows (one per sample and position) that are probabilities (each ``>= 0``, summing to 1) or, for
``nll_loss``, not log-probabilities (``logsumexp`` over the classes not 0). The counts are ``"sum"`` states: every
rank's rows add up. It writes nothing; :class:`callbacks.judges.loss_input.LossInputCheck` reads it, and
:class:`callbacks.judges.data.SmallBatch` the rows per step.

The mode is also on for the steps it records in the last fifth of the fit (:data:`LATE`, when the fit's length is
known), where it reads the loss of up to :data:`LATE_ROWS` rows given to ``cross_entropy`` with class-index targets:
how many the model fits well (below ``ln(C) / 2``) and worse than a uniform guess (above ``ln(C)``), and their mean
loss and its spread (beside the validation loss: :mod:`callbacks.probes.validation`), for
:class:`callbacks.judges.data.NoisyLabels` (wrong labels). Whether the model has an active dropout (which makes the
training loss higher than the validation loss by design) is read at the start of fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from callbacks._cadence import Cadence, Moment
from callbacks._compile import HAS_STANCE, is_compiled
from callbacks._stats import Summary
from callbacks.probes.base import Probe, Recording

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: the first recorded steps on which the loss's inputs are checked (the bug is in the code: it shows on step 0)
CHECKED_STEPS = 3
#: the share of the fit after which the rows' own losses are read as well (for wrong labels: the model has learnt
#: what it can by then), and the most rows read a step (evenly spaced: a language model's vocabulary is large)
LATE, LATE_ROWS = 0.8, 256
#: the dropout modules (active in training, not in validation)
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: how far from 1 (from 0) a row's sum (its logsumexp) may be and still count as probabilities (log-probabilities):
#: a float32 softmax sums to 1 within 1e-6, a bfloat16 one within 1e-2
TOLERANCE = 2e-2


@dataclass
class LossInputs:
    prefix: ClassVar[str] = "loss_input"  # its probe's: a judge reads it as `readouts[LossInputs]`
    step: int
    checked: bool  # whether the calls were watched on this step
    cross_entropy_rows: int  # input rows (samples x positions) given to cross_entropy
    cross_entropy_probability_rows: int  # of which probabilities (>= 0, summing to 1)
    nll_rows: int  # input rows given to nll_loss
    nll_probability_rows: int  # of which probabilities
    nll_not_log_rows: int  # of which not log-probabilities (logsumexp over the classes not 0)
    nll_mean_logsumexp: float  # the mean logsumexp of those (NaN: none)
    classes: int  # C, the size of the class dimension (the largest seen)
    micro_batches: int = 1  # the Trainer's accumulate_grad_batches: the rows above are the first micro-batch's
    # the last fifth of the fit (:data:`LATE`): sampled rows given to cross_entropy with class-index targets, and of
    # those, the ones the model fits well (loss below half of ln C) and worse than a uniform guess (above ln C)
    late_rows: int = 0
    late_good_rows: int = 0
    late_bad_rows: int = 0
    late_loss_sum: float = 0.0  # the sum of those rows' losses (nats)
    late_loss_squares: float = 0.0  # the sum of their squares
    dropout: bool = False  # whether the model has a dropout module with p > 0 (train and validation losses differ)


class _Watch(TorchFunctionMode):
    """Hands the inputs of the watched loss functions to ``on_call``; every call goes on unchanged."""

    def __init__(self, on_call: Callable[[Callable[..., Any], Tensor, Any], None]) -> None:
        super().__init__()
        self.on_call = on_call

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy or func is F.nll_loss:
            x = args[0] if args else kwargs.get("input")
            target = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(x, Tensor) and x.is_floating_point() and x.numel() > 0:
                self.on_call(func, x, target)
        return func(*args, **kwargs)


class LossInputProbe(Probe):
    """Checks what ``cross_entropy`` and ``nll_loss`` are given in the training step (see the module docstring)."""

    prefix = "loss_input"
    has_histograms = False

    def __init__(self, cadence: Cadence | None = None, checked_steps: int = CHECKED_STEPS) -> None:
        super().__init__(cadence or Cadence(histogram_every_n_steps=0, figure_every_n_steps=0))
        if isinstance(checked_steps, bool) or not isinstance(checked_steps, int) or checked_steps < 0:
            raise ValueError(f"Expected `checked_steps` to be an int >= 0, but got {checked_steps!r}.")
        self.checked_steps = checked_steps
        for name in ("ce_rows", "ce_prob_rows", "nll_rows", "nll_prob_rows", "nll_not_log_rows", "nll_lse_sum"):
            self.add_state(name, "sum")
        for name in ("late_rows", "late_good_rows", "late_bad_rows", "late_loss_sum", "late_loss_squares"):
            self.add_state(name, "sum")
        self.add_state("classes", "max")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._checks = 0  # recorded steps checked so far in this fit
        self._mode: _Watch | None = None
        self._checking = False
        self._usable = True
        self._micro_batches = 1
        self._late = False
        self._trainer: pl.Trainer | None = None
        self._late_from = math.inf  # the first global step of the last fifth (inf: the fit's length is not known)
        self._dropout = False

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a compiled model runs eagerly on recorded steps only where torch has `set_stance`: elsewhere a function mode
        # inside its graphs is not something to impose
        self._usable = HAS_STANCE or not is_compiled(pl_module)
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        self._micro_batches = accumulate if isinstance(accumulate, int) and accumulate > 0 else 1
        self._trainer = trainer
        self._dropout = any(isinstance(m, DROPOUT) and m.p > 0 for m in pl_module.modules())
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # an iterable without a length and no max_steps: no last fifth to find
            total = math.inf
        self._late_from = LATE * total if math.isfinite(total) and total > 0 else math.inf

    def detach(self) -> None:
        self.stop()
        self._trainer = None

    # -- a recorded step: the mode is on from its start until the backward (or an exception)
    def start_states(self, device: torch.device) -> None:
        super().start_states(device)
        self._checking = self._usable and self._checks < self.checked_steps
        step = self._trainer.global_step if self._trainer is not None else -1
        self._late = self._usable and step >= self._late_from
        if self._checking:
            self._checks += 1
        if self._checking or self._late:
            self._mode = _Watch(self._on_call)
            self._mode.__enter__()

    def stop(self) -> None:
        """Turns the mode off (the end of a step, an exception, the end of fit); safe to call again."""
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def before_backward(self, rec: Recording) -> None:
        self.stop()  # the loss is computed: the backward and the optimizer's step run without the mode

    def end_step(self, rec: Recording, outputs: Any) -> None:
        if self in rec.moments:
            self.stop()

    def _on_call(self, func: Callable[..., Any], x: Tensor, target: Any) -> None:
        with torch.no_grad():
            x = x.detach()
            if self._late and func is F.cross_entropy:
                self._late_losses(x, target)
            if not self._checking:
                return
            dim = 1 if x.dim() >= 2 else 0  # (C,), (N, C) or (N, C, d1, ...): the class dimension
            classes = x.shape[dim]
            sums = x.sum(dim, dtype=torch.float64)
            probabilities = (x >= 0).all(dim) & ((sums - 1).abs() <= TOLERANCE)
            rows, prob_rows = sums.numel(), int(probabilities.sum())
            self.classes.clamp_(min=classes)
            if func is F.cross_entropy:
                self.ce_rows += rows
                self.ce_prob_rows += prob_rows
                return
            lse = x.double().logsumexp(dim)
            not_log = (lse.abs() > TOLERANCE) | (x > TOLERANCE).any(dim)
            self.nll_rows += rows
            self.nll_prob_rows += prob_rows
            self.nll_not_log_rows += int(not_log.sum())
            self.nll_lse_sum += lse[not_log].sum()

    def _late_losses(self, x: Tensor, target: Any) -> None:
        """Counts, over up to :data:`LATE_ROWS` rows, how many the model fits well and worse than a uniform guess
        (class-index targets only; rows whose target is negative, e.g. an ``ignore_index`` of -100, left out)."""
        if x.dim() < 2 or not isinstance(target, Tensor) or target.is_floating_point():
            return
        classes = x.shape[1]
        self.classes.clamp_(min=classes)  # (C of the late steps too: the judge compares with ln C)
        rows = x.movedim(1, -1).reshape(-1, classes)
        labels = target.reshape(-1)
        if len(labels) != len(rows) or classes < 2:
            return
        if len(rows) > LATE_ROWS:
            pick = torch.linspace(0, len(rows) - 1, LATE_ROWS, device=rows.device).long()
            rows, labels = rows[pick], labels[pick]
        valid = (labels >= 0) & (labels < classes)  # masked, not indexed: no device sync
        losses = F.cross_entropy(rows.float(), labels.clamp(0, classes - 1), reduction="none")
        uniform = math.log(classes)
        self.late_rows += valid.sum()
        self.late_good_rows += ((losses < 0.5 * uniform) & valid).sum()
        self.late_bad_rows += ((losses > uniform) & valid).sum()
        losses = losses.double().where(valid, 0.0)
        self.late_loss_sum += losses.sum()
        self.late_loss_squares += losses.square().sum()

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> LossInputs:
        not_log, classes = int(self.nll_not_log_rows.item()), self.classes.item()
        return LossInputs(
            step,
            checked=self._checking,
            cross_entropy_rows=int(self.ce_rows.item()),
            cross_entropy_probability_rows=int(self.ce_prob_rows.item()),
            nll_rows=int(self.nll_rows.item()),
            nll_probability_rows=int(self.nll_prob_rows.item()),
            nll_not_log_rows=not_log,
            nll_mean_logsumexp=self.nll_lse_sum.item() / not_log if not_log else float("nan"),
            classes=int(classes) if math.isfinite(classes) else 0,
            micro_batches=self._micro_batches,
            late_rows=int(self.late_rows.item()),
            late_good_rows=int(self.late_good_rows.item()),
            late_bad_rows=int(self.late_bad_rows.item()),
            late_loss_sum=self.late_loss_sum.item(),
            late_loss_squares=self.late_loss_squares.item(),
            dropout=self._dropout,
        )
