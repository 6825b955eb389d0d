"""Attention logits and entropy per attention layer and head: the first sign of attention logit growth.

Wortsman et al. (2023, "Small-scale proxies for large-scale Transformer training instabilities") reproduce at small
scale what breaks large Transformers: at a high learning rate the attention logits ``q·k/√d`` grow without bound,
the softmax turns one-hot (the attention entropy collapses toward 0) and the loss diverges; qk-layernorm
(Dehghani et al. 2023) prevents it. This probe reads, on recorded steps, every attention call's q and k as the
kernel gets them (rotary embeddings applied), through :class:`callbacks._attention.AttentionTap` (the one place
that intercepts ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` and Hugging Face's eager attention,
on recorded steps only), and keeps per layer and head:

- the largest ``|q·k|·scale`` over the positions the mask allows (a ``"max"`` state: exact across ranks);
- a high quantile of it (``quantile``, default 0.99), read from a histogram on fixed log-spaced bins (``"sum"``
  state: the counts of every rank add up exactly; the quantile is exact to within one bin, 9 %);
- the attention entropy, and its share of a uniform row's (``log`` of the allowed keys), as sums over rows
  (``"sum"`` states: the global mean).

Exact or sampled (the readout says which): a call with at most ``max_queries`` query positions is measured on
every row; a longer one on ``max_queries`` positions spread evenly (the maxima and entropies of those rows).
A NaN logit (a diverged run) makes its head's maximum NaN and its row count in no bin; it never stops training.

Which modules: ``nn.MultiheadAttention``, and every module whose class name says attention (``...Attention``,
``...Attn``: nanoGPT's ``CausalSelfAttention``, Hugging Face's ``GPT2Attention``, ``LlamaAttention``), or those
``modules`` names. An attention call outside them is counted as ``(outside)``. A model without any gets no probe
from ``HealthMonitor``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from callbacks._attention import LOG_BINS, AttentionTap, attention_stats, quantile_from_hist
from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._selection import ModuleSpec, check_specs, select_modules
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar

if TYPE_CHECKING:
    import lightning.pytorch as pl

#: a class name that says attention: "...Attention", "...SelfAttention", "...Attn" (case-insensitive)
ATTENTION_NAME = re.compile(r"(attention|attn)$", re.IGNORECASE)
#: per-head columns kept per layer: heads beyond it fold onto these (the layer's numbers stay exact)
MAX_HEADS = 64
OUTSIDE = "(outside)"


@dataclass
class AttentionLayer:
    """One attention layer (module) on a recorded step."""

    name: str
    label: str  # "h.0.attn (CausalSelfAttention)"
    logit_max: float  # the largest |q·k|·scale over the allowed positions
    logit_quantile: float  # the `quantile` of |q·k|·scale (to within a bin, 9 %)
    entropy: float  # mean attention entropy over rows (nats)
    entropy_share: float  # mean entropy / mean entropy of uniform rows (1: uniform, 0: one-hot)
    head_logit_max: list[float] = field(default_factory=list)  # per head (empty: more heads than MAX_HEADS)
    head_entropy_share: list[float] = field(default_factory=list)
    calls: int = 0
    rows: int = 0  # query rows measured (all heads and batch elements)
    queries: int = 0  # query rows of the calls (rows == queries: exact; fewer: sampled)

    @property
    def exact(self) -> bool:
        return self.rows >= self.queries


@dataclass
class Attention:
    prefix: ClassVar[str] = "attention"  # its probe's: a judge reads it as `readouts[Attention]`
    step: int
    quantile: float
    layers: list[AttentionLayer]  # in the order the modules were selected, "(outside)" last


CHARTS = {
    "logit_max": Chart(
        "attention logits: max |q·k|/√d per layer (growth: qk-layernorm or a lower lr)", "attention/logit_max", order=80
    ),
    "entropy": Chart(
        "attention entropy, share of uniform (near 0: one-hot attention)", "attention/entropy_share", order=81
    ),
}


def is_attention(module: nn.Module) -> bool:
    """Whether the default selection watches ``module``: ``nn.MultiheadAttention`` or a class named like one."""
    return isinstance(module, nn.MultiheadAttention) or bool(ATTENTION_NAME.search(type(module).__name__))


def attention_modules(root: nn.Module, specs: tuple[ModuleSpec, ...] | None = None) -> list[tuple[str, nn.Module]]:
    """``(tag name, module)`` of the attention modules of ``root`` (``specs``: types and/or name patterns)."""
    found: dict[str, nn.Module] = {}
    pairs = select_modules(root, specs) if specs is not None else root.named_modules()
    for qualified, module in pairs:
        if qualified and (specs is not None or is_attention(module)):
            found.setdefault(tag_name(qualified), module)
    return list(found.items())


class AttentionProbe(Probe):
    """Watches the attention logits ``|q·k|/√d`` and the attention entropy of every attention layer and head.

    Tags per layer: ``attention/{name}/logit_max``, ``/logit_quantile`` (the ``quantile``), ``/entropy`` (nats) and
    ``/entropy_share`` (of a uniform row's).

    Args:
        modules: module types and/or ``fnmatch`` patterns of qualified names (default: see the module docstring).
        cadence: when it records (default: the scalars of ``Trainer(log_every_n_steps)``).
        quantile: the high quantile of ``|q·k|/√d`` reported beside the max, in (0, 1).
        max_queries: query positions measured per call at most (a longer sequence is sampled evenly).

    Raises:
        ValueError: for invalid arguments.
    """

    prefix = "attention"
    has_histograms = False

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        cadence: Cadence | None = None,
        quantile: float = 0.99,
        max_queries: int = 256,
    ) -> None:
        super().__init__(cadence or Cadence(histogram_every_n_steps=0))
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
            raise ValueError(f"Expected `quantile` to be a number in (0, 1), but got {quantile!r}.")
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"Expected `max_queries` to be an int >= 1, but got {max_queries!r}.")
        self.modules = check_specs(modules, "modules")
        self.quantile = float(quantile)
        self.max_queries = max_queries
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.layers: list[tuple[str, nn.Module]] = []
        self.tap: AttentionTap | None = None
        self._rec: Recording | None = None
        self._error: Exception | None = None  # the first error of a measurement this step

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = attention_modules(pl_module, self.modules)
        self.tap = AttentionTap([m for _, m in self.layers], self._on_call)
        n = len(self.layers) + 1  # the last slot: calls outside every watched module
        self.add_state("head_max", "max", (n, MAX_HEADS))
        for name in ("head_entropy", "head_uniform", "head_rows"):
            self.add_state(name, "sum", (n, MAX_HEADS))
        self.add_state("logit_hist", "sum", (n, LOG_BINS))
        self.add_state("call_count", "sum", n)
        self.add_state("query_rows", "sum", n)  # query rows of the calls, times heads and batch
        self.add_state("head_count", "max", n)

    def watching(self, trainer: pl.Trainer) -> bool:
        return bool(self.layers)  # no attention module: the tap never goes on

    def detach(self) -> None:
        self.stop()
        self.layers, self.tap = [], None

    # -- a recorded step: the tap is on from the start of the step to its end (or an exception)
    def start_states(self, device: torch.device) -> None:
        super().start_states(device)
        self.begin_step(None)

    def begin_step(self, rec: Recording | None) -> None:
        """The start of a step this probe records: the tap goes on."""
        if self.tap is not None and self.layers:  # (a model without attention modules: nothing to intercept)
            self._rec = rec
            self.tap.start()

    def stop(self) -> None:
        """Turns the tap off (the end of a step, an exception, the end of fit); safe to call again."""
        if self.tap is not None:
            self.tap.stop()
        self._rec = None

    def end_step(self, rec: Recording, outputs: object) -> None:
        if self in rec.moments:
            self.stop()
            error, self._error = self._error, None
            if error is not None:
                raise error

    def _on_call(self, slot: int, q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float | None) -> None:
        if self._error is not None:
            return
        try:
            self._measure(slot, q, k, mask, causal, scale)
        except Exception as error:  # never in the model's forward: raised by `end_step`, on every rank
            self._error = error

    def _measure(self, slot: int, q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float | None) -> None:
        s = attention_stats(q, k, mask, causal, scale, max_queries=self.max_queries)
        h = s.max_abs.numel()
        cols = torch.arange(h, device=s.max_abs.device) % MAX_HEADS
        device = self.head_max.device
        row = self.head_max[slot]
        row.scatter_reduce_(0, cols.to(device), s.max_abs.to(device), reduce="amax")
        for name, value in (("head_entropy", s.entropy), ("head_uniform", s.uniform), ("head_rows", s.rows)):
            getattr(self, name)[slot].index_add_(0, cols.to(device), value.to(device))
        self.logit_hist[slot] += s.hist.to(device)
        self.call_count[slot] += 1
        self.query_rows[slot] += s.batch * s.queries * h
        self.head_count[slot] = torch.maximum(
            self.head_count[slot], torch.tensor(float(h), dtype=torch.float64, device=device)
        )

    # -- reading the reduced step
    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Attention:
        names = [(n, f"{n} ({type(m).__name__})") for n, m in self.layers] + [(OUTSIDE, OUTSIDE)]
        layers = []
        for i, (name, label) in enumerate(names):
            calls = int(self.call_count[i])
            if calls == 0:
                continue
            heads = min(int(self.head_count[i]), MAX_HEADS)
            rows, ent, uni = self.head_rows[i, :heads], self.head_entropy[i, :heads], self.head_uniform[i, :heads]
            per_head = int(self.head_count[i]) <= MAX_HEADS
            total_rows = float(rows.sum())
            layers.append(
                AttentionLayer(
                    name,
                    label,
                    logit_max=float(self.head_max[i, :heads].max()),
                    logit_quantile=quantile_from_hist(self.logit_hist[i].tolist(), self.quantile),
                    entropy=float(ent.sum()) / total_rows if total_rows else math.nan,
                    entropy_share=_share(float(ent.sum()), float(uni.sum())),
                    head_logit_max=self.head_max[i, :heads].tolist() if per_head else [],
                    head_entropy_share=[_share(e, u) for e, u in zip(ent.tolist(), uni.tolist(), strict=True)]
                    if per_head
                    else [],
                    calls=calls,
                    rows=int(total_rows),
                    queries=round(float(self.query_rows[i])),
                )
            )
        return self._keep(Attention(step, self.quantile, layers), moment, bool(layers))

    def scalars(self, readout: Attention) -> list[Scalar]:
        out = []
        for layer in readout.layers:
            tag = f"attention/{layer.name}"
            out += [
                Scalar(f"{tag}/logit_max", layer.logit_max, layer.label, CHARTS["logit_max"]),
                Scalar(f"{tag}/logit_quantile", layer.logit_quantile),
                Scalar(f"{tag}/entropy", layer.entropy),
                Scalar(f"{tag}/entropy_share", layer.entropy_share, layer.label, CHARTS["entropy"]),
            ]
        return out

    def rows(self) -> tuple[list[str], list[list[str]]]:
        last = self.latest
        rows = [
            [
                x.label,
                f"{x.logit_max:.3g}",
                f"{x.logit_quantile:.3g}",
                f"{x.entropy_share:.2f}",
                "exact" if x.exact else f"sampled ({x.rows} of {x.queries} rows)",
            ]
            for x in (last.layers if last is not None else [])
        ]
        return [
            "layer",
            "max |q·k|/√d",
            f"q{last.quantile if last else self.quantile:g}",
            "entropy share",
            "rows",
        ], rows


def _share(entropy: float, uniform: float) -> float:
    return entropy / uniform if uniform > 0 else math.nan
