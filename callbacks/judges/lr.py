"""Learning-rate advice per layer, from the update:data history: which parameters sit how far from 1e-3.

The lecture's rule: ``log10(std(update) / std(weight))`` about -3 is healthy; well above (-2 and higher) the
learning rate is too high for that parameter, well below (-4 and lower) too low. At the end of fit each parameter's
typical ratio is the median of its recorded ratios while its learning rate was near its peak (within a factor
:data:`PEAK_BAND`), each brought to the peak (``+ log10(peak / lr)``: an update is proportional to the learning rate),
after the first tenth of the fit: a schedule's decay lowers every ratio on purpose, and a step schedule's peak phase
or a warm-up-then-cosine schedule's first half are where the learning rate is judged. The output layer scaled
down at init (the lecture's softmax fix) sits above the rest while its weights are small: a note, not a problem.
It holds for any optimizer: the updates are measured, not computed from the gradient.

The update:data factor is a hypothesis, judged against the loss's own evidence (issue 24): following "divide the
learning rate by 58" on a net whose loss fell as far as the healthy nets' cost 0.14 nats. So a learning rate above
the line is a **problem** only when the loss shows it at the peak learning rate (the training loss rose from its
best, ended above where it started, swung by more than all it fell, or went non-finite);
otherwise it is a note, with no action. When it is a problem the advice moves the learning rate by one decade at
most (:data:`MAX_STEP_DOWN`): the sweeps in ``benchmarks/results/lr_calibration.md`` show the loss flat over a
decade below a too-high rate and worse two decades below. Too low (below -4) is a problem while the loss is still
falling at the end of fit (it would go on improving with larger steps), moved by at most :data:`MAX_STEP_UP`.

Where the ratio is within its band (or unknown: a diverged fit), or its verdict was only a note, the loss alone can
still say it (AutoTrainer's symptoms, Zhang et al. 2021), never against a ratio pointing the other way: too high
(divide by 10) when it went non-finite or ended above where it started, whatever the ratio (a wrecked net's ratio
reads low), or oscillates (:func:`loss_evidence`); too low
(times 10) when it still falls as fast at the end as at the start (:func:`slow_descent`) or, for a fresh classifier,
barely moved while creeping down (:data:`STUCK`). Their thresholds are measured on the fault zoo's bases and
mutants (``benchmarks/results/fault_zoo.md``). No per-layer advice goes against a model-wide problem's direction.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping
from typing import Any

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.loss import Loss
from callbacks.probes.update import UpdateRatios

#: the lecture's healthy log10 update:data ratio, and how far (in decades) a parameter may sit from it: above -2 the
#: learning rate is too high, below -4 too low (the lecture's words). Measured in benchmarks/results/
#: diagnosis_gallery.md: the lecture's nets at its lr 0.1 (SGD), -2.85 to -2.51; a small GPT at nanoGPT's AdamW lr
#: 1e-3, -2.03 to -2.01 (its weights start at 0.02 and Adam's steps are about the lr: an AdamW Transformer sits near
#: the line); 10x the lecture's lr, -1.24 on the Kaiming tanh net but -1.98 on the deep BatchNorm net (BatchNorm lets
#: the weights grow, so 10x the lr raises the ratio by only half a decade); 100x too low, -5.2 (SGD) and -5.0 (AdamW).
TARGET, TOLERANCE = -3.0, 1.0
#: a parameter this many decades from the median parameter is advised on by itself
APART = 0.5
#: recorded steps a parameter needs in its peak-lr phase for advice
MIN_POINTS = 5
#: the points judged: those whose learning rate is at least the peak / PEAK_BAND (a cosine decay's first half; at
#: most log10(2) = 0.3 decades brought back to the peak)
PEAK_BAND = 2.0
#: the most the advice moves the learning rate down / up in one go (calibrated: benchmarks/results/lr_calibration.md)
MAX_STEP_DOWN, MAX_STEP_UP = 10.0, 100.0
#: the training loss "rose" when the median of its last fifth of recorded points is above the lowest median of any
#: earlier fifth by at least this many nats and by 3 standard errors of the difference (see loss_evidence)
RISE = 0.05
#: the loss is "still falling" when its last fifth's median is this many nats below the fifth before it
FALL = 0.02
#: "oscillating": the loss's step-to-step noise (robust, from successive differences) is at least this many times
#: all it fell (from where it started to its best fifth) and a tenth of where it started (a loss that never fell
#: does not swing for a little noise): the steps throw it about more than training moved it. The
#: fault zoo's healthy bases: 0.01-0.23; SGD at lr x 100 on the blobs MLP 1.8 (it ended below where it started, so
#: "blown up" misses it); batch 2 on the names MLP 2.4
OSCILLATION = 1.0
#: "slow": over the last three fifths of the peak-lr phase the loss fell at least this share of what it fell over
#: the first two (from where it started), clearly beyond its noise: it descends as fast at the end as at the start,
#: so the fit ends far from where a larger step would take it. Measured on the fault zoo's bases
#: (benchmarks/results/fault_zoo.md): healthy fits 0.01-0.22 (a loss that levels off), learning rate / 100 0.75-1.02
#: (SGD and AdamW alike, where the update:data ratio of AdamW does not move out of the lecture's band)
SLOW = 0.5
#: "stuck": a fit that started as a fresh classifier (step 0's loss within 25 % of ln C) whose best fifth is less
#: than this share below where it started, while the loss creeps down (a least-squares slope below zero by
#: :data:`TREND` standard errors): it barely moved, and not for want of a gradient. The fault zoo's CNN at lr / 100
#: fell 4.5 % in 600 steps, too little for :func:`slow_descent` to tell from its noise (t = -5.5 over the fit);
#: its healthy bases fell 28-99 %. A fine-tuned model starts far below ln C and is never judged by it.
STUCK, TREND = 0.1, 3.0
#: a loss at step 0 within these factors of ln(C) is a fresh classifier's: a model trained from scratch, not one
#: being fine-tuned (which starts far below ln C)
FRESH = (0.9, 1.25)


def fresh(first: float, uniform: float) -> bool:
    """Whether step 0's loss ``first`` is a fresh classifier's, against ``uniform = ln(C)`` (False when either is NaN).

    Example::

        >>> fresh(3.4, math.log(27)), fresh(0.8, math.log(27)), fresh(3.4, float("nan"))
        (True, False, False)
    """
    return FRESH[0] * uniform <= first <= FRESH[1] * uniform


def loss_evidence(losses: list[float], start: float = math.nan) -> str:
    """What the recorded training losses say about the learning rate: ``"diverged"`` (a non-finite loss),
    ``"blown up"`` (the last fifth's median above ``start``, the loss the fit started from: training made it
    worse), ``"oscillating"`` (its step-to-step noise at least :data:`OSCILLATION` times all it fell, from ``start``
    to its best fifth, and a tenth of ``start``), ``"rising"`` (the last fifth's median above the best earlier
    fifth's beyond their noise), ``"falling"`` (the last fifth's median below the previous fifth's by :data:`FALL`),
    ``"plateaued"``, or ``"unknown"`` (too few points).

    Example::

        >>> loss_evidence([3.0, 2.8, 2.6, 2.5, 2.4] + [2.4] * 5), loss_evidence([float("nan")] * 10)
        ('plateaued', 'diverged')
        >>> loss_evidence([40.0, 31, 30, 31, 32], start=3.3)
        'blown up'
        >>> loss_evidence([0.6, 2.9, 0.5, 3.0, 0.7, 2.8, 0.4, 3.1, 0.6, 2.9], start=1.8)
        'oscillating'
    """
    if any(not math.isfinite(v) for v in losses):
        return "diverged"
    n = len(losses) // 5
    if n < 1:
        return "unknown"
    fifths = [statistics.median(losses[i * n : (i + 1) * n]) for i in range(4)] + [statistics.median(losses[4 * n :])]
    if fifths[-1] > start:
        return "blown up"
    # a fifth's median has a standard error of about 1.25 sigma / sqrt(points); a rise must clear 3 of the
    # difference's (sqrt(2) of that): per-batch losses of batch 32 spread by ~0.2 nats, so fifths of 12 points
    # differ by up to ~0.2 by chance (the lecture's nets at SGD lr 0.1-3: +0.07 to +0.2, all as healthy)
    # sigma from successive differences: a trend does not count as noise
    sigma = 1.4826 * statistics.median(abs(b - a) for a, b in itertools.pairwise(losses[n:])) / math.sqrt(2)
    if sigma >= OSCILLATION * max(
        start - min(fifths), 0.1 * start
    ):  # and a tenth of the start: a stuck loss is no swing
        return "oscillating"
    rise = max(RISE, 3 * math.sqrt(2) * 1.2533 * sigma / math.sqrt(n))
    if fifths[-1] > min(fifths[:-1]) + rise:
        return "rising"
    if fifths[-1] < fifths[-2] - FALL:
        return "falling"
    return "plateaued"


def slow_descent(losses: list[float], start: float) -> float | None:
    """How much of its early drop the loss still makes late: ``(f1 - f4) / (start - f1)`` over the medians of the
    fifths ``f0..f4`` of ``losses``, when the late drop ``f1 - f4`` is beyond 3 standard errors of the noise (None:
    too few points, not finite, or no clear late drop). Compare with :data:`SLOW`.

    Example::

        >>> round(slow_descent([3.2, 3.15, 3.1, 3.05, 3.0, 2.95, 2.9, 2.85, 2.8, 2.75], start=3.3), 2)  # a line
        1.33
        >>> round(slow_descent([2.5, 2.4, 2.35, 2.3, 2.3, 2.3, 2.3, 2.3, 2.3, 2.3], start=3.3), 2)  # levelling off
        0.03
        >>> slow_descent([3.3] * 10, start=3.3) is None  # not falling at all
        True
    """
    n = len(losses) // 5
    if n < 2 or not all(math.isfinite(v) for v in losses) or not math.isfinite(start):
        return None
    fifths = [statistics.median(losses[i * n : (i + 1) * n]) for i in range(4)] + [statistics.median(losses[4 * n :])]
    sigma = 1.4826 * statistics.median(abs(b - a) for a, b in itertools.pairwise(losses)) / math.sqrt(2)
    late, early = fifths[1] - fifths[4], start - fifths[1]
    if late <= max(FALL, 3 * math.sqrt(2) * 1.2533 * sigma / math.sqrt(n)) or early <= 0:
        return None
    return late / early


def trend(losses: list[float]) -> float:
    """The t statistic of the least-squares slope of ``losses`` over their index (negative: falling); 0 for fewer
    than 3 points or a perfect fit with no slope.

    Example::

        >>> round(trend([2.0, 1.9, 2.1, 1.8, 1.9, 1.7]), 1)
        -1.9
    """
    n = len(losses)
    if n < 3:
        return 0.0
    mx, my = (n - 1) / 2, statistics.fmean(losses)
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (v - my) for i, v in enumerate(losses)) / sxx
    residual = sum((v - my - slope * (i - mx)) ** 2 for i, v in enumerate(losses)) / (n - 2)
    if residual <= 0:
        return 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return slope / math.sqrt(residual / sxx)


def typical_ratio(history: list[float], lrs: list[float]) -> float | None:
    """The median log10 ratio near the peak lr (within :data:`PEAK_BAND`), brought to the peak, after the first tenth
    of the points (None: too few). A point whose lr is not known is taken as it is."""
    known = [lr for lr in lrs if math.isfinite(lr) and lr > 0]
    peak = max(known) if known else None
    start = len(history) // 10
    points = []
    for i, r in enumerate(history):
        if i < start or not math.isfinite(r):
            continue
        lr = lrs[i] if i < len(lrs) else math.nan
        if peak is None or not math.isfinite(lr) or lr <= 0:
            points.append(r)
        elif lr * PEAK_BAND >= peak * (1 - 1e-9):
            points.append(r + math.log10(peak / lr))
    return statistics.median(points) if len(points) >= MIN_POINTS else None


def _times(ratio: float) -> str:
    """How many times the lecture's 1e-3 a log10 ratio is: ``"~12×"`` or ``"~1/30"``."""
    factor = 10 ** (ratio - TARGET)
    return f"~{factor:.0f}×" if factor >= 1 else f"~1/{1 / factor:.0f}"


class LearningRateAdvice(Judge):
    """At the end of fit: the learning rate too high or too low, for the model or for single layers."""

    reads = (UpdateRatios,)  # and the loss, when its probe recorded the step

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []  # the training loss of each recorded step after the first (the loss probe's)
        self.lrs: list[float] = []  # the highest learning rate of any parameter at each of those steps
        self.start = math.nan  # where the loss started: the larger of step 0's loss and ln(C), when known
        self.first = math.nan  # step 0's loss itself
        self.uniform = math.nan  # ln(C), when C is known

    def state_dict(self) -> dict[str, Any]:
        # a resumed fit judges the loss of the whole fit
        return {
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "start": self.start,
            "first": self.first,
            "uniform": self.uniform,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.losses = [float(v) for v in state.get("losses", [])]
        self.lrs = [float(v) for v in state.get("lrs", [math.nan] * len(self.losses))]
        self.start = float(state.get("start", math.nan))
        self.first = float(state.get("first", math.nan))
        self.uniform = float(state.get("uniform", math.nan))

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        loss = readouts.get(Loss)
        if loss is None:
            return []
        if step == 0:
            uniform = math.log(loss.classes) if loss.classes else math.nan
            self.start = max((v for v in (loss.value, uniform) if math.isfinite(v)), default=math.nan)
            self.first, self.uniform = float(loss.value), uniform
            return []
        ratios = readouts.get(UpdateRatios)
        lrs = [h[-1] for h in (ratios.lrs.values() if ratios else []) if h and math.isfinite(h[-1])]
        self.losses.append(float(loss.value))
        self.lrs.append(max(lrs) if lrs else math.nan)
        return []

    def _peak_losses(self) -> list[float]:
        """The losses recorded while the learning rate was near its peak (all of them when it is not known)."""
        known = [lr for lr in self.lrs if math.isfinite(lr)]
        if not known:
            return self.losses
        peak = max(known)
        return [v for v, lr in zip(self.losses, self.lrs, strict=True) if not lr * PEAK_BAND < peak * (1 - 1e-9)]

    def _peak_start(self) -> float:
        """Where the loss stood when the peak-lr phase began: :attr:`start` when the fit began at its peak, else the
        phase's first recorded loss (after a warm-up)."""
        known = [lr for lr in self.lrs if math.isfinite(lr)]
        if not known or not self.lrs or not math.isfinite(self.lrs[0]) or self.lrs[0] * PEAK_BAND >= max(known):
            return self.start
        peak = self._peak_losses()
        return peak[0] if peak else math.nan

    def _from_loss(self, step: int, median: float) -> Finding | None:
        """The model-wide learning rate judged from the training loss alone (AutoTrainer's exploding, oscillating
        and slow-convergence symptoms), when the update:data ratio does not point the other way: a loss that went
        non-finite, ended above where it started or oscillates (:func:`loss_evidence`; too high: divide by
        :data:`MAX_STEP_DOWN`), or one that still descends as fast at the end as at the start (too low,
        :func:`slow_descent` >= :data:`SLOW`: times 10)."""
        ratio = "" if not math.isfinite(median) else f" (the median update:data ratio, 10^{median:.1f}, is"
        ratio += " within the lecture's band)" if ratio and abs(median - TARGET) <= TOLERANCE else ")" if ratio else ""
        peak = self._peak_losses()
        evidence = loss_evidence(peak, self.start)
        low = median < TARGET - TOLERANCE
        if low and evidence in ("diverged", "blown up"):
            # a loss that left its start behind upward wrecked the net: its saturated or dead units pass little
            # gradient, so its updates read small now (the fault zoo's deep net at lr x 100: 10^-6.4); the loss wins
            ratio = (
                f" (the median update:data ratio reads low, 10^{median:.1f}: a wrecked net's units pass little"
                " gradient)"
            )
        if evidence in ("diverged", "blown up") or (evidence == "oscillating" and not low):
            went = {
                "diverged": "went non-finite",
                "blown up": f"ended above where it started ({self.start:.2f})",
                "oscillating": "swung from one recorded step to the next by more than all it fell",
            }[evidence]
            message = f"The training loss {went} at the peak learning rate{ratio}: the steps are too large."
            fix = f"Divide the learning rate by about {MAX_STEP_DOWN:.0f} (one step of the loop)."
            action = Action("scale_lr", (), 1 / MAX_STEP_DOWN, f"loss {evidence}")
            return Finding("lr/model", step, "", message, fix, "update_ratio/history", action=action)
        if median > TARGET + TOLERANCE:
            return None  # the ratio says too high: the loss's signs of too low are not taken against it
        slow = slow_descent(peak, self._peak_start())
        if slow is not None and slow >= SLOW:
            message = (
                f"The training loss still falls as fast at the end as at the start (over the last three fifths of the"
                f" peak-lr phase it fell {slow:.2f}x what it fell over the first two){ratio}: the fit ends far from"
                " converged, and larger steps would go further in the same budget."
            )
            fix, evidence = ", or train for longer.", f"loss slow ({slow:.2f})"
        elif (moved := self._stuck(peak)) is not None:
            message = (
                f"The training loss barely moved: from {self.start:.2f} (a fresh classifier's, ln C ="
                f" {self.uniform:.2f}) its best fifth is {moved:.1%} lower, though it keeps creeping down{ratio}: the"
                " steps are too small to get anywhere in this budget."
            )
            fix, evidence = ".", f"loss stuck ({moved:.1%} down)"
        else:
            return None
        fix = "Multiply the learning rate by about 10 (one step of the loop)" + fix
        return Finding("lr/model", step, "", message, fix, "loss", action=Action("scale_lr", (), 10.0, evidence))

    def _stuck(self, peak: list[float]) -> float | None:
        """How far (a share of the start) the loss's best fifth got, when the fit is "stuck" (:data:`STUCK`)."""
        n = len(peak) // 5
        if n < 2 or not fresh(self.first, self.uniform) or not all(math.isfinite(v) for v in peak):
            return None
        best = min(statistics.median(peak[i * n : (i + 1) * n]) for i in range(5))
        moved = (self.start - best) / self.start
        return moved if moved < STUCK and trend(peak) <= -TREND else None

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        ratios = readouts[UpdateRatios]
        typical = {
            n: r
            for n, history in ratios.history.items()
            if (r := typical_ratio(history, ratios.lrs.get(n, []))) is not None
        }
        found: list[Finding] = []
        median = statistics.median(typical.values()) if typical else math.nan
        if abs(median - TARGET) > TOLERANCE:
            high = median > TARGET
            # too high: how the loss fared at the peak learning rate; too low: whether it still falls at the end
            evidence = loss_evidence(self._peak_losses(), self.start) if high else loss_evidence(self.losses)
            found.append(self._model_wide(step, median, evidence))
        if not found or found[0].severity == "note":
            # the ratio says nothing, or the loss did not bear it out: the loss's own evidence, where it is clear
            from_loss = self._from_loss(step, median)
            found = [from_loss] if from_loss is not None else found
        if not typical:
            return found
        # the model's learning rate is a problem one way: a layer's ratio pointing the other way is not advice (in a
        # fit whose loss blew up, the layers that look slow beside the median are no reason to raise their lr)
        model_wide = next((f.action for f in found if f.action is not None), None)
        for name, r in typical.items():
            if abs(r - TARGET) <= TOLERANCE or abs(r - median) <= APART:
                continue
            high = r > TARGET
            if model_wide is not None and high != (float(model_wide.value) < 1):  # type: ignore[arg-type]
                continue
            if high and name == ratios.output:  # the lecture's expected exception
                message = (
                    f"`{name}`, the output layer: updates are 10^{r:.1f} of the weight, {_times(r)} the lecture's"
                    f" 1e-3 (the median parameter: 10^{median:.1f})."
                )
                fix = (
                    "Expected while its weights are small (an output layer scaled down at init, as the lecture does):"
                    " its ratio comes down as they grow. Nothing to change while the loss falls."
                )
                found.append(Finding(f"lr/{name}", step, name, message, fix, "update_ratio/history", "note"))
                continue
            message = (
                f"`{name}`: updates are 10^{r:.1f} of the weight, {_times(r)} the lecture's 1e-3 (the median parameter:"
                f" 10^{median:.1f}): the learning rate is too {'high' if high else 'low'} for this layer."
            )
            fix = (
                f"Give it a parameter group of its own with a learning rate about {10 ** abs(r - TARGET):.0f}×"
                f" {'smaller' if high else 'larger'}"
                + (", or check its init (its weights may be too small)." if high else ", or check what starves it.")
            )
            factor = 10 ** (TARGET - r)
            factor = max(factor, 1 / MAX_STEP_DOWN) if high else min(factor, MAX_STEP_UP)
            action = Action("scale_lr", (name,), factor, f"update:data 10^{r:.1f}, median 10^{median:.1f}")
            found.append(Finding(f"lr/{name}", step, name, message, fix, "update_ratio/history", action=action))
        return found

    @staticmethod
    def _model_wide(step: int, median: float, evidence: str) -> Finding:
        """The model-wide advice: a problem (with an action) only when the loss agrees (see the module docstring)."""
        high = median > TARGET
        message = (
            f"The learning rate is too {'high' if high else 'low'} for most layers: the median parameter's updates"
            f" are 10^{median:.1f} of its weights, {_times(median)} the lecture's 1e-3 (at the peak learning rate);"
            f" the training loss: {evidence}."
        )
        suggested = 10 ** abs(median - TARGET)
        problem = (
            evidence in ("rising", "blown up", "diverged", "oscillating")
            if high
            else evidence in ("falling", "unknown")
        )
        if not problem:
            fix = (
                f"The loss shows no sign of it ({evidence}): nothing to change. The ratio alone suggests about"
                f" {suggested:.0f}× {'smaller' if high else 'larger'}: the sweeps show that costs as often as it helps."
            )
            return Finding("lr/model", step, "", message, fix, "update_ratio/history", "note")
        factor = min(suggested, MAX_STEP_DOWN if high else MAX_STEP_UP)
        capped = f" (one step of the loop; the ratio alone says about {suggested:.0f})" if factor < suggested else ""
        fix = f"{'Divide' if high else 'Multiply'} the learning rate by about {factor:.0f}{capped}."
        action = Action("scale_lr", (), 1 / factor if high else factor, f"update:data 10^{median:.1f}, loss {evidence}")
        return Finding("lr/model", step, "", message, fix, "update_ratio/history", action=action)
