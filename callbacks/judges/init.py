"""The check at initialisation: the lecture's first look at a network, on the first training step, before any update.

Step 0 of a fresh fit is recorded in full (``callbacks._cadence``); this judge reads it once:

- the loss against ``ln(C)``, the loss of a uniform guess over ``C`` classes: far above it, the output layer is
  confidently wrong (27.9 against 3.30 with the lecture's naive init);
- every bounded activation's saturation (tanh outputs beyond 0.97: their local gradient ``1 - t**2`` is about 0);
- the activations' std across depth, for stacks of the same activation: shrinking toward the output (vanishing
  signal, a too-small gain) or growing (exploding);
- the gradients w.r.t. those activations across depth, from the last layer back to the first;
- parameters whose grad:data ratio is far from the others';
- biases right before a batch normalisation (which subtracts them).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any, Literal

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.activation import Activations, Layer
from callbacks.probes.gradient import Gradients
from callbacks.probes.loss import Loss
from callbacks.probes.parameter import ParameterGradients

# The numbers that justify each threshold are measured in benchmarks/results/diagnosis_gallery.md ("Margins").
#: a loss this many times ln(C) at initialisation is confidently wrong (the lecture: 27.9 / 3.30; the gallery's
#: healthy runs at most 1.01x, its over-confident output layers 5.4x and 7.3x)
LOSS_RATIO = 1.25
#: a bounded activation with more of its outputs than this near the bounds at initialisation is saturated
#: (the lecture's healthy inits: 5-21 % beyond 0.97, the gallery's at most 22 %; its naive init about 70 %)
SATURATION = 0.4
#: std of the last of a stack of like activations against the first: below VANISHING the signal fades (the
#: gallery's healthy stacks, BatchNorm nets and GPTs: 0.99-1.02; the deep tanh stack at PyTorch's default init,
#: a gain of 1/sqrt(3) where tanh needs 5/3: 0.16); EXPLODING: no gallery run grows, 3x is the mirror of 0.3
VANISHING, EXPLODING = 0.3, 3.0
#: gradient std at the first watched activation against the last: below or above these, vanishing or exploding.
#: The gallery's healthy nets: 1.13-2.25 (gradients no smaller toward the input); the deep tanh stack at PyTorch's
#: default init: 0.095 (0.58x a layer over four layers), too close to the former 0.1 to be told reliably, so the
#: same 0.3 as the signal's. Exploding: above 10x (healthy at most 2.25x).
GRAD_VANISHING, GRAD_EXPLODING = 0.3, 10.0
#: a parameter's grad:data this many times above the median parameter's (the healthy runs of
#: benchmarks/results/diagnosis_gallery.md, weights not initialised small: at most 4.5x, the deep BatchNorm net)
GRAD_TO_DATA_SPREAD = 10.0
#: ... or this many times below it. A model may initialise some weights smaller on purpose, which raises their
#: ratios and the median: the GPT-2 init scales the residual projections by 1/sqrt(2 n_layer), and its healthy runs
#: have their attention and MLP input weights up to 9.7x below the median; the lecture's nets at most 4.5x. Sick
#: runs: the embedding under a deep tanh stack without Kaiming's gain (gradients vanished before reaching it) 46x,
#: a block's MLP weights with one row scaled x100 (an outlier feature) 53x.
GRAD_TO_DATA_LOW = 30.0
#: the gain of Kaiming's init, per activation name, as the lecture uses it
GAINS = {"Tanh": "5/3", "ReLU": "sqrt(2)", "LeakyReLU": "sqrt(2)", "GELU": "sqrt(2)", "SiLU": "sqrt(2)"}


def _kind(label: str) -> str:
    """``"net.2 (Tanh)"`` -> ``"Tanh"``."""
    return label.rsplit("(", 1)[-1].rstrip(")") if "(" in label else ""


def _gain(kind: str) -> str:
    return f"gain {GAINS[kind]} for {kind}" if kind in GAINS else "the gain of the activation"


class InitCheck(Judge):
    """The lecture's look at a network before its first update (see the module docstring)."""

    reads = (Loss,)  # and whichever of Activations, Gradients and ParameterGradients step 0 has

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def reset(self) -> None:
        self.done = False

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.done = bool(state.get("done", False))

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        if step != 0 or self.done:
            return []
        self.done = True
        found: list[Finding] = []
        found += self._loss(readouts[Loss])
        if (acts := readouts.get(Activations)) is not None:
            found += self._activations(acts)
        if (grads := readouts.get(Gradients)) is not None:
            found += self._gradients(grads)
        if (params := readouts.get(ParameterGradients)) is not None:
            found += self._parameters(params)
        return found

    @staticmethod
    def _loss(loss: Loss) -> list[Finding]:
        if loss.classes is None or not math.isfinite(loss.value):
            return []
        uniform = math.log(loss.classes)
        if loss.value <= LOSS_RATIO * uniform:
            return []
        where = loss.source.split(" ")[0].strip("`") if loss.source != "given" else "the output layer"
        message = (
            f"At initialisation the loss is {loss.value:.2f}, far above {uniform:.2f} = ln({loss.classes}), the loss"
            f" of a uniform guess over {loss.classes} classes (C from {loss.source}): the output layer is"
            " confidently wrong, and the first steps only squash its logits (the hockey-stick loss curve)."
        )
        fix = "Scale the output layer's weights down (e.g. × 0.01) and zero its bias, so the first softmax is uniform."
        action = Action("scale_layer", (where,), 0.01, f"init loss {loss.value:.2f} vs ln C {uniform:.2f}")
        return [Finding("init/loss", 0, where, message, fix, "loss", action=action)]

    @staticmethod
    def _activations(acts: Activations) -> list[Finding]:
        found = []
        layers = sorted(acts.layers, key=lambda layer: layer.summary.order)  # forward order
        for layer in layers:
            if layer.saturation is None or layer.saturation <= SATURATION:
                continue
            fix = (
                f"Its input is normalised by `{layer.norm_before}`: check that norm's initial gain (1 is right)."
                if layer.norm_before
                else "Scale the weights feeding it down: std(W) = gain / sqrt(fan_in) (Kaiming,"
                f" {_gain(_kind(layer.label))}), or put a BatchNorm before it."
            )
            message = (
                f"`{layer.label}` is saturated at initialisation: {layer.saturation:.0%} of its outputs are near"
                " ±1, where its local gradient 1 - t² is about 0: those units barely learn."
            )
            action = (
                None  # a norm's gain of 1 saturating: nothing generic to change
                if layer.norm_before
                else Action("init", (layer.name,), "kaiming", f"{layer.saturation:.0%} saturated at init")
            )
            found.append(
                Finding(
                    f"init/saturation/{layer.name}",
                    0,
                    layer.label,
                    message,
                    fix,
                    "activation/distribution",
                    action=action,
                )
            )
        by_kind: dict[str, list[Layer]] = {}
        for layer in layers:
            if layer.kind is not None and layer.summary.std > 0:
                by_kind.setdefault(_kind(layer.label), []).append(layer)
        for kind, stack in by_kind.items():
            if len(stack) < 3:
                continue
            first, last = stack[0], stack[-1]
            ratio = last.summary.std / first.summary.std
            stds = ", ".join(f"{layer.summary.std:.2g}" for layer in stack)
            if ratio < VANISHING:
                message = (
                    f"The {kind} activations shrink with depth at initialisation: std {stds} from `{first.label}` to"
                    f" `{last.label}` ({ratio:.2f}×): the signal fades toward the output, and so will the gradients."
                )
                fix = (
                    f"The init's gain is too small for {kind}: use std(W) = gain / sqrt(fan_in) ({_gain(kind)}), or a"
                    " normalisation layer (BatchNorm) before each activation."
                )
                action = Action("init", tuple(x.name for x in stack), "kaiming", f"std last/first {ratio:.2f}")
                found.append(
                    Finding(
                        f"init/vanishing/{kind}", 0, last.label, message, fix, "activation/distribution", action=action
                    )
                )
            elif ratio > EXPLODING and last.saturation is None:
                message = (
                    f"The {kind} activations grow with depth at initialisation: std {stds} from `{first.label}` to"
                    f" `{last.label}` ({ratio:.1f}×): the signal explodes toward the output."
                )
                fix = f"The init's gain is too large: use std(W) = gain / sqrt(fan_in) ({_gain(kind)}), or normalise."
                action = Action("init", tuple(x.name for x in stack), "kaiming", f"std last/first {ratio:.1f}")
                found.append(
                    Finding(
                        f"init/exploding/{kind}", 0, last.label, message, fix, "activation/distribution", action=action
                    )
                )
        return found

    @staticmethod
    def _gradients(grads: Gradients) -> list[Finding]:
        # the gradients arrive in backward order, from the last layer to the first: reversed, forward order
        layers = [g for g in sorted(grads.layers, key=lambda g: -g.summary.order) if g.summary.std > 0]
        if len(layers) < 3:
            return []
        first, last = layers[0], layers[-1]
        ratio = first.summary.std / last.summary.std
        if GRAD_VANISHING <= ratio <= GRAD_EXPLODING:
            return []
        trend = "vanish" if ratio < GRAD_VANISHING else "explode"
        message = (
            f"At initialisation the gradients {trend} toward the input: their std is {first.summary.std:.2e} at"
            f" `{first.label}` against {last.summary.std:.2e} at `{last.label}` ({ratio:.2g}×); healthy layers have"
            " gradients of about the same size."
        )
        fix = (
            "Look for saturated activations between them, and use std(W) = gain / sqrt(fan_in) (Kaiming) or a"
            " normalisation layer so every layer keeps the signal's size."
        )
        action = Action("init", (), "kaiming", f"gradient std first/last {ratio:.2g}")
        return [
            Finding(
                f"init/gradients/{trend}", 0, first.label, message, fix, "activation_grad/distribution", action=action
            )
        ]

    @staticmethod
    def _parameters(params: ParameterGradients) -> list[Finding]:
        found = []
        ratios = {p.name: g for p in params.params if math.isfinite(g := p.grad_to_data) and g > 0}
        if len(ratios) >= 3:
            median = statistics.median(ratios.values())
            for p in params.params:
                r = ratios.get(p.name)
                if r is None or GRAD_TO_DATA_SPREAD * median >= r >= median / GRAD_TO_DATA_LOW:
                    continue
                high = r > median
                times = r / median if high else median / r
                message = (
                    f"`{p.name}` has a grad:data ratio of {r:.2g} at initialisation, {times:.0f}×"
                    f" {'above' if high else 'below'} the median parameter's {median:.2g}."
                )
                if high and p.data.std < 0.05:  # small weights: the output layer scaled down, as the lecture does
                    fix = (
                        "Expected for weights initialised small on purpose (an output layer scaled down, as the lecture"
                        " does); it settles within the first few hundred steps. Nothing to change unless it stays."
                    )
                    severity: Literal["problem", "note"] = "note"
                elif high:
                    fix = "Its weights are too small for their gradients: check its init scale."
                    severity = "problem"
                else:
                    fix = (
                        "Its gradients are small for its weights, so with SGD it hardly learns: look for gradients"
                        " vanishing before they reach it (saturated or dead units, a too-small gain), or weights"
                        " initialised too large."
                    )
                    severity = "problem"
                action = (
                    Action("init", (), "kaiming", f"grad:data {times:.0f}x off the median")
                    if severity == "problem"
                    else None
                )
                found.append(
                    Finding(
                        f"init/grad_to_data/{p.name}",
                        0,
                        p.name,
                        message,
                        fix,
                        "param_grad/distribution",
                        severity,
                        action,
                    )
                )
        for bias, norm in params.biases_before_norm:
            message = (
                f"`{bias}` is a bias right before `{norm}`, which subtracts each feature's batch mean: it is unused."
            )
            fix = "Drop it (bias=False in the layer before the BatchNorm); the norm's own shift (beta) plays its role."
            found.append(Finding(f"init/bias/{bias}", 0, bias, message, fix, "", "note"))
        return found
