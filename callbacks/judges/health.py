"""The monitors' health warnings, as judges: each reads one probe's readouts on its recorded steps.

Calibrated on the lecture's runs (``benchmarks/results/health_table.md``): its healthy nets raise none of them.
A condition must hold on ``patience`` consecutive recorded steps before it is reported, once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any, ClassVar

from callbacks._stats import Summary
from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.activation import Activations
from callbacks.probes.gradient import Gradients
from callbacks.probes.parameter import ParameterGradients
from callbacks.probes.update import UpdateRatios


class Saturation(Judge):
    """A bounded activation (tanh, sigmoid, ...) with more than ``limit`` of its outputs near the bounds."""

    reads = (Activations,)

    def __init__(self, limit: float, threshold: float, patience: int = 3) -> None:
        super().__init__()
        self.limit, self.threshold, self.patience = limit, threshold, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        found = []
        for layer in readouts[Activations].layers:
            if layer.saturation is None:
                continue
            key = f"saturation/{layer.name}"
            if self.record.streak(key, layer.saturation > self.limit) != self.patience:
                continue
            fix = (
                f"Its input is already normalised by `{layer.norm_before}`: the norm's gain has grown, so lower the"
                " learning rate (or weight-decay the norm's weight)."
                if layer.norm_before
                else "Scale the weights of the layer before it down (e.g. gain / sqrt(fan_in), Kaiming), or"
                " normalise its input (BatchNorm/LayerNorm)."
            )
            message = (
                f"`{layer.label}` is saturated: {layer.saturation:.1%} of its outputs beyond {self.threshold} of the"
                f" range (> {self.limit:.0%}), where its gradient is cut."
            )
            action = (
                Action("scale_lr", (), 0.3, f"{layer.saturation:.0%} saturated behind a norm")
                if layer.norm_before
                else Action("init", (layer.name,), "kaiming", f"{layer.saturation:.0%} saturated")
            )
            found.append(Finding(key, step, layer.label, message, fix, "activation/distribution", action=action))
        return found


#: ReLU-like activations with a gradient below zero (GELU, SiLU, ...): a unit never positive in a batch still learns,
#: and a trained Transformer's GELUs have many such (token, feature) units. Their limit is at least this: the healthy
#: GPT runs of benchmarks/results/diagnosis_gallery.md reach 20 %, the one whose learning rate jumped x30 88 %.
SOFT_DEAD = 0.5


class DeadUnits(Judge):
    """A ReLU-like activation with more than ``limit`` of its units never positive in a batch (GELU-like ones: more
    than :data:`SOFT_DEAD` of them, if that is higher)."""

    reads = (Activations,)

    def __init__(self, limit: float, patience: int = 3) -> None:
        super().__init__()
        self.limit, self.patience = limit, patience
        self.reset()

    def reset(self) -> None:
        self.first: int | None = None  # the fit's first recorded step
        self.since: dict[str, int] = {}  # key -> the step its current streak began

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "since": dict(self.since)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first = state.get("first")
        self.since = dict(state.get("since", {}))

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        found = []
        if self.first is None:
            self.first = step
        for layer in readouts[Activations].layers:
            if layer.dead is None:
                continue
            key = f"dead/{layer.name}"
            limit = self.limit if layer.gradient_below_zero == "none" else max(self.limit, SOFT_DEAD)
            streak = self.record.streak(key, layer.dead > limit)
            if streak == 1:
                self.since[key] = step
            if streak != self.patience:
                continue
            if layer.gradient_below_zero == "none":
                what = "they get no gradient, so they never learn again"
            else:  # GELU, SiLU, ELU, LeakyReLU: a small gradient below zero
                what = "they sit in the negative tail, where the gradient is small (not zero): they learn slowly"
            message = (
                f"`{layer.label}` has {layer.dead:.1%} dead units (never positive in a batch, > {limit:.0%}): {what}."
            )
            if self.since.get(key) == self.first == 0:  # dead before any update: the init did it, not the lr
                message += " They were dead at initialisation, before any update."
                fix = (
                    "Re-initialise the layer feeding it (std = gain / sqrt(fan_in), Kaiming; its bias at 0): a"
                    " learning rate cannot revive units that never get a gradient."
                )
                action = Action("init", (layer.name,), "kaiming", f"{layer.dead:.0%} dead from step 0")
            else:
                fix = "Usually a too-high learning rate pushed their biases negative; lower it, or check the init."
                action = Action("scale_lr", (), 0.1, f"{layer.dead:.0%} dead units")
            found.append(Finding(key, step, layer.label, message, fix, "activation/distribution", action=action))
        return found


class VanishingGradients(Judge):
    """A layer whose activation-gradient std is below ``ratio`` of the largest layer's."""

    reads = (Gradients,)

    def __init__(self, ratio: float, patience: int = 3) -> None:
        super().__init__()
        self.ratio, self.patience = ratio, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        layers = [g for g in readouts[Gradients].layers if g.summary.count > 0 and not math.isnan(g.summary.std)]
        if not layers:
            return []
        top = max(g.summary.std for g in layers)
        found = []
        for g in layers:
            std, key = g.summary.std, f"vanishing/{g.name}"
            bad = std == 0.0 or (len(layers) > 1 and std < self.ratio * top)
            if self.record.streak(key, bad) == self.patience:
                message = (
                    f"gradients at `{g.label}` are vanishing: std {std:.2e} against {top:.2e} for the largest layer."
                )
                fix = "Check for saturated activations or a too-small init before it."
                action = Action("init", (), "kaiming", f"gradient std {std:.1e} vs {top:.1e}")
                found.append(Finding(key, step, g.label, message, fix, "activation_grad/distribution", action=action))
        return found


class VanishingParameterGradients(Judge):
    """A parameter whose grad:data ratio stays below ``limit``."""

    reads = (ParameterGradients,)

    def __init__(self, limit: float, patience: int = 3) -> None:
        super().__init__()
        self.limit, self.patience = limit, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        found = []
        for p in readouts[ParameterGradients].params:
            key = f"vanishing/{p.name}"
            if self.record.streak(key, p.grad_to_data < self.limit or p.grad.std == 0.0) == self.patience:
                message = (
                    f"gradient of `{p.name}` is vanishing: grad:data ratio {p.grad_to_data:.2e} (< {self.limit:.0e})"
                    f" for {self.patience} logged steps."
                )
                fix = "Check for saturated activations or a too-small init after it."
                action = Action("init", (), "kaiming", f"grad:data {p.grad_to_data:.1e}")
                found.append(Finding(key, step, p.name, message, fix, "param_grad/distribution", action=action))
        return found


#: why the live learning-rate warnings are notes: the ratio alone is a hypothesis. The fault zoo's healthy GPTs
#: (AdamW at their best lr, weights of std 0.02) sit above -2 all fit long, and following the ratio alone cost as
#: often as it helped (benchmarks/results/lr_calibration.md); `judges.lr.LearningRateAdvice` weighs it against the loss
RULE_ALONE = (
    "This is the update:data rule alone (the lecture's 1e-3); HealthMonitor's learning-rate advice at the end of fit"
    " weighs it against the loss."
)


class LearningRate(Judge):
    """The median parameter's log10 update:data ratio outside ``[low, high]`` for ``patience`` recorded steps: a note
    (:data:`RULE_ALONE`), warned as it happens.

    The median, because the learning rate is one number for every layer: a single parameter far above the rest
    (an output layer scaled down at init: its small weights make every update large relative to them, for the
    first thousands of steps) is expected, not a wrong lr. Each ratio is taken at the highest learning rate its
    parameter had so far (``+ log10(peak / lr)``: an update is proportional to the lr, for SGD and Adam alike), so a
    schedule's decay, which lowers every ratio on purpose, is not "too low": the lecture's BatchNorm net under AdamW
    at lr 1e-3 sits at -3.1 at its peak and at -4.2 after its step schedule's drop.
    """

    reads = (UpdateRatios,)

    def __init__(self, low: float, high: float, patience: int) -> None:
        super().__init__()
        self.low, self.high, self.patience = low, high, patience
        self._peaks = _Peaks()

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        ratios = readouts[UpdateRatios]
        shifts = {n: self._peaks.below_peak(n, ratios.lrs.get(n, [])) for n in ratios.ratios}
        finite = sorted((v + shifts[n], n) for n, v in ratios.ratios.items() if math.isfinite(v))
        if not finite:
            return []
        median = statistics.median(v for v, _ in finite)
        (lo, lo_name), (hi, hi_name) = finite[0], finite[-1]
        peak = " at the peak learning rate so far" if any(shifts.values()) else ""
        found = []
        if self.record.streak("lr/low", median < self.low) == self.patience:
            message = (
                f"updates are tiny: the median parameter's log10(update/data){peak} is {median:.2f} < {self.low} for"
                f" {self.patience} logged steps (smallest: `{lo_name}` {lo:.2f})."
            )
            fix = f"The learning rate may be too low. {RULE_ALONE}"
            found.append(Finding("lr/low", step, "", message, fix, "update_ratio/history", "note"))
        if self.record.streak("lr/high", median > self.high) == self.patience:
            message = (
                f"updates are large: the median parameter's log10(update/data){peak} is {median:.2f} > {self.high} for"
                f" {self.patience} logged steps (largest: `{hi_name}` {hi:.2f})."
            )
            fix = f"The learning rate may be too high. {RULE_ALONE}"
            found.append(Finding("lr/high", step, "", message, fix, "update_ratio/history", "note"))
        return found


class _Peaks:
    """Each parameter's highest learning rate so far, read from its growing history one new entry at a time (the
    history has an entry per recorded step: rescanning it every step would cost quadratic time over a fit)."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[list[float], int, float]] = {}  # name -> (its history, entries read, peak)

    def below_peak(self, name: str, lrs: list[float]) -> float:
        """``log10(peak / lr)``: how many decades the last learning rate of ``lrs`` is below the highest so far (0:
        none known)."""
        known, read, peak = self._read.get(name, (lrs, 0, 0.0))
        if known is not lrs or read > len(lrs):  # another list (a reset, a checkpoint loaded): read it all
            read, peak = 0, 0.0
        for lr in lrs[read:]:
            if lr > peak and math.isfinite(lr):
                peak = lr
        self._read[name] = (lrs, len(lrs), peak)
        last = lrs[-1] if lrs else math.nan
        if peak <= 0 or not math.isfinite(last) or last <= 0:
            return 0.0
        return math.log10(peak / last)


class NonFinite(Judge):
    """NaN/inf in a probe's tensors (``watched``: the activations, their gradients or the parameters' gradients):
    once, naming where they appeared first."""

    #: per readout: the order "first" is in
    ORDER: ClassVar[dict[type, str]] = {
        Activations: "forward order",
        Gradients: "backward order",
        ParameterGradients: "parameter order",
    }

    def __init__(self, watched: type[Activations | Gradients | ParameterGradients]) -> None:
        super().__init__()
        if watched not in self.ORDER:
            raise TypeError(
                f"Expected Activations, Gradients or ParameterGradients (a readout class), but got {watched!r}."
            )
        self.reads = (watched,)
        self.watched = watched

    @staticmethod
    def _items(readout: Activations | Gradients | ParameterGradients) -> list[tuple[str, str, Summary]]:
        """``(tag, label, summary)`` in selection order."""
        if isinstance(readout, ParameterGradients):
            return [(f"{readout.prefix}/{p.name}", f"{readout.prefix}/{p.name}", p.grad) for p in readout.params]
        return [(f"{readout.prefix}/{x.name}", x.label, x.summary) for x in readout.layers]

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        bad = [(tag, label, s) for tag, label, s in self._items(readouts[self.watched]) if s.nonfinite]
        if not bad or "nonfinite" in self.record.warned:
            return []
        tag, _, s = bad[0]
        in_parameters = self.watched is ParameterGradients  # no forward or backward order: the first listed
        first_tag, first_label, first = bad[0] if in_parameters else min(bad, key=lambda item: item[2].order)
        place = (
            f"first in parameter order: `{first_tag}` of {len(bad)} affected"
            if in_parameters
            else f"first at `{first_label}` (of {len(bad)} affected, in {self.ORDER[self.watched]})"
        )
        message = (
            f"{s.nonfinite} non-finite values (NaN/inf) in `{tag}` ({place}, step {step}, rank {first.nonfinite_rank});"
            f" they are counted in `{tag}/nonfinite` and left out of the statistics. Warned once."
        )
        action = Action("scale_lr", (), 0.1, "non-finite values")  # most often a learning rate that diverged
        return [Finding("nonfinite", step, first_label, message, action=action)]
