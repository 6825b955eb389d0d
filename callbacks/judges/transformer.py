"""The Transformer instabilities of Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer training
instabilities"), each with the layer and the fix, from the attention, output-logit and Adam-ε probes' readouts.

- :class:`AttentionLogitGrowth`: a layer's largest attention logit ``|q·k|/√d`` above ``limit``. At 50 the
  softmax gives the next key ``e**-50`` of the top one's weight: attention is one-hot and its gradient vanishes;
  the logits then grow without bound (quadratically in the weights). Fix: qk-layernorm (a LayerNorm on q and k
  per head, Dehghani et al. 2023), or a lower learning rate.
- :class:`AttentionEntropyCollapse`: a layer's mean attention entropy below ``share`` of a uniform row's (Zhai et
  al. 2023's entropy collapse), usually with the growth above.
- :class:`OutputLogitDivergence`: the output layer's mean log Z (log-sum-exp of the logits) farther than
  ``limit`` from 0. Fix: z-loss, ``1e-4 * log Z**2`` added to the loss (PaLM).
- :class:`EpsDominatedUpdates`: a parameter whose typical ``sqrt(v_hat)`` (the RMS over its elements) is below
  Adam's ε, so that ε dominates the denominator in most elements and its updates shrink toward zero. Fix: a
  smaller ε (or find why its gradients are so small).

Each holds on ``patience`` consecutive recorded steps before it is reported, once. Thresholds and their measured
margins: ``benchmarks/results/transformer_sweep.md`` (the learning-rate sweep of a small GPT, with and without
qk-layernorm and z-loss).
"""

from __future__ import annotations

import math

from callbacks.judges.base import Finding, Judge, Readouts
from callbacks.probes.adam import AdamEps
from callbacks.probes.attention import Attention
from callbacks.probes.logits import OutputLogits


class AttentionLogitGrowth(Judge):
    """A layer whose largest attention logit ``|q·k|/√d`` stays above ``limit``."""

    reads = (Attention,)

    def __init__(self, limit: float = 50.0, patience: int = 2) -> None:
        super().__init__()
        self.limit, self.patience = limit, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        attention = readouts[Attention]
        found = []
        for layer in attention.layers:
            key = f"attention_logits/{layer.name}"
            if self.record.streak(key, layer.logit_max > self.limit) != self.patience:
                continue
            heads = layer.head_logit_max
            worst = f" (head {max(range(len(heads)), key=heads.__getitem__)})" if heads else ""
            message = (
                f"Attention logits are growing in `{layer.label}`{worst}: max |q·k|/√d is {layer.logit_max:.3g}"
                f" (q{attention.quantile:g}: {layer.logit_quantile:.3g}; above {self.limit:g} for {self.patience}"
                f" logged steps), so its softmax is one-hot (entropy {layer.entropy_share:.0%} of uniform) and passes"
                " almost no gradient: attention logit growth, which precedes divergence."
            )
            fix = (
                "Add qk-layernorm (a LayerNorm on q and on k, per head, before q·k) to the attention,"
                " or lower the learning rate."
            )
            found.append(Finding(key, step, layer.label, message, fix, "attention/logit_max"))
        return found


class AttentionEntropyCollapse(Judge):
    """A layer whose mean attention entropy stays below ``share`` of a uniform row's."""

    reads = (Attention,)

    def __init__(self, share: float = 0.1, patience: int = 2) -> None:
        super().__init__()
        self.share, self.patience = share, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        attention = readouts[Attention]
        found = []
        for layer in attention.layers:
            key = f"attention_entropy/{layer.name}"
            low = not math.isnan(layer.entropy_share) and layer.entropy_share < self.share
            if self.record.streak(key, low) != self.patience:
                continue
            message = (
                f"Attention entropy collapsed in `{layer.label}`: {layer.entropy:.3g} nats on average,"
                f" {layer.entropy_share:.1%} of a uniform row's (below {self.share:.0%} for {self.patience} logged"
                f" steps): each query attends to one key (max |q·k|/√d {layer.logit_max:.3g})."
            )
            fix = "Add qk-layernorm to the attention, or lower the learning rate."
            found.append(Finding(key, step, layer.label, message, fix, "attention/entropy_share"))
        return found


class OutputLogitDivergence(Judge):
    """The output layer's mean log Z farther than ``limit`` from 0."""

    reads = (OutputLogits,)

    def __init__(self, limit: float = 20.0, patience: int = 3) -> None:
        super().__init__()
        self.limit, self.patience = limit, patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        logits = readouts.get(OutputLogits)  # None: no output layer to read
        if logits is None:
            return []
        key = "output_logits"
        if self.record.streak(key, abs(logits.log_z_mean) > self.limit) != self.patience:
            return []
        message = (
            f"The output logits are diverging in `{logits.layer}`: their mean log Z (log-sum-exp) is"
            f" {logits.log_z_mean:+.3g} (from {logits.log_z_min:+.3g} to {logits.log_z_max:+.3g};"
            f" beyond ±{self.limit:g} for {self.patience} logged steps), the logits range from"
            f" {logits.logit_min:.3g} to {logits.logit_max:.3g}: output logit divergence."
        )
        fix = "Add z-loss to the loss: `loss + 1e-4 * torch.logsumexp(logits, -1).square().mean()`."
        return [Finding(key, step, logits.layer, message, fix, "logits")]


class EpsDominatedUpdates(Judge):
    """A parameter whose RMS of ``sqrt(v_hat)`` is below Adam's ε, ε dominating in more than ``share`` of it (not
    one whose gradient is zero but for rounding: ``sqrt(v_hat)`` below ``floor`` times the parameters' median)."""

    reads = (AdamEps,)

    def __init__(self, share: float = 0.5, patience: int = 3, floor: float = 1e-4) -> None:
        super().__init__()
        self.share, self.patience, self.floor = share, patience, floor

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        adam = readouts.get(AdamEps)  # None: no Adam to read
        if adam is None or not adam.params:
            return []
        # a parameter whose gradient is zero but for rounding (the bias of a LayerNorm on k: the softmax ignores
        # what adds the same to every key) has nothing for ε to shrink: below `floor` x the median, it is skipped
        scales = sorted(p.sqrt_v_rms for p in adam.params)
        least = self.floor * scales[len(scales) // 2]
        found = []
        for p in adam.params:
            key = f"adam_eps/{p.name}"
            holds = least < p.sqrt_v_rms < p.eps and p.dominated > self.share
            if self.record.streak(key, holds) != self.patience:
                continue
            message = (
                f"Adam's ε dominates the updates of `{p.name}`: its gradient scale sqrt(v_hat) is {p.sqrt_v_rms:.2e}"
                f" (RMS) against ε = {p.eps:.0e}, ε is the larger in {p.dominated:.0%} of its elements, and ε takes"
                f" {p.shrink:.0%} off its updates on average (update RMS {p.update_rms:.3f} × lr)."
            )
            fix = f"Use a smaller ε (e.g. {p.eps * 1e-4:.0e}, or 1e-8, 1e-15 for bf16-scale gradients)."
            found.append(Finding(key, step, p.name, message, fix, f"adam_eps/{p.name}/dominated"))
        return found
