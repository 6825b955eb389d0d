"""Outlier activations: a watched module whose largest output is orders of magnitude above its typical one.

A few features (channels) growing far above the rest is how Transformers' "outlier features" start; they hurt
quantisation and precede instabilities. For each watched module on recorded steps: ``max |y|`` against the root
mean square of ``y`` (both of the global batch). A Gaussian of a million values peaks near 5 RMS; a bounded
activation cannot go past its bound. Above ``ratio`` on ``patience`` consecutive recorded steps, the module is named.

Calibrated in ``benchmarks/results/diagnosis_gallery.md``: held for 3 logged steps, the healthy runs' largest ratio
is 24 (a small GPT's GELUs after 1,000 steps; ReLUs half killed by a too-high learning rate: 28); one channel of a
GPT block's MLP 100x the others: 66. With one outlier among ``n`` features the ratio cannot exceed
about ``5 sqrt(n)`` (the outlier dominates the RMS), 80 for the GPT's 256: wider layers show it more.
"""

from __future__ import annotations

import math

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.activation import Activations


class OutlierActivations(Judge):
    """A module whose ``max |output|`` stays above ``ratio`` times its output's RMS."""

    reads = (Activations,)

    def __init__(self, ratio: float = 50.0, patience: int = 3) -> None:
        super().__init__()
        self.ratio, self.patience = ratio, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        found = []
        for layer in readouts[Activations].layers:
            s = layer.summary
            if s.count == 0:
                continue
            rms = math.sqrt(max(s.sum_squares, 0.0) / s.count)
            peak = max(abs(s.min), abs(s.max))
            ratio = peak / rms if rms > 0 else 0.0
            key = f"outlier/{layer.name}"
            if self.record.streak(key, ratio > self.ratio) != self.patience:
                continue
            message = (
                f"`{layer.label}` has outlier activations: its largest output, {peak:.3g}, is {ratio:.0f}× its RMS"
                f" {rms:.3g} (above {self.ratio:.0f}× for {self.patience} logged steps): a few features dominate it."
            )
            fix = (
                "Find the features (its histogram's far tail) and what feeds them: check the normalisation before it"
                " (its gain), add weight decay, or lower the learning rate."
            )
            # the layer feeding it, re-initialised at its activation's gain, removes what grew there
            action = Action("init", (layer.name,), "kaiming", f"max/RMS {ratio:.0f}")
            found.append(Finding(key, step, layer.label, message, fix, "activation/distribution", action=action))
        return found
