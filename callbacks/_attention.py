"""Attention logits from q and k: the math, and the one labelled place that sees a model's attention calls.

**The math** (:func:`attention_stats`): for one attention call, the scaled logits ``s = scale * q·k`` (``scale``
defaults to ``1/sqrt(d)``), over the entries the mask lets through (boolean ``attn_mask`` True; a float mask above
``-inf`` and above half its dtype's lowest value, which Hugging Face's masks use; ``is_causal``'s top-left lower
triangle: as ``F.scaled_dot_product_attention`` reads them), per head: the largest ``|s|``; the attention entropy
``-sum p log p`` of ``p = softmax(s + float mask)`` summed over query rows; ``log(allowed keys)`` summed likewise
(the entropy of a uniform row: the ratio of the two sums is the entropy's share of uniform); and a histogram of
``|s|`` on fixed log-spaced bins (:data:`LOG_BINS`; the same on every call and rank, so the counts add up exactly
and a quantile reads from them to within a bin).

Exact or sampled: a call with at most ``max_queries`` query positions is measured on every row (exact);
a longer one on ``max_queries`` positions spread evenly from the first to the last (sampled: the maxima are the
maxima of those rows, the entropies their mean; ``rows`` against ``queries`` says how many). The logits are
recomputed from q and k in blocks of at most :data:`BLOCK` entries, whatever the kernel the model
ran (flash and memory-efficient kernels never materialise them), in float32, without gradient.

**The tap** (:class:`AttentionTap`), the interception, on recorded steps only (``start`` ... ``stop``; ``stop``
runs on every exit path and is idempotent). It replaces, for the duration of the step, three functions by
wrappers that call the original unchanged and hand q and k to the probe:

- ``torch.nn.functional.scaled_dot_product_attention`` (public): a user's own block, Hugging Face's ``sdpa``
  attention, ``nn.MultiheadAttention`` without weights. q and k are those the kernel gets (rotary embeddings
  applied). A module that imported the function by name (``from torch.nn.functional import
  scaled_dot_product_attention``) before the step keeps torch's own, unseen: call it as ``F.…``.
- ``torch.nn.functional.multi_head_attention_forward`` (public), for ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` in training (whose fused inference path never runs with
  gradients): q and k recomputed from its arguments (the in-projection, ``attn_mask``, ``key_padding_mask``), also
  when it returns the weights and calls no SDPA; its inner SDPA call is then not counted twice.
- Hugging Face's ``eager_attention_forward`` of the model's modeling module (a module-level function, not a
  documented API: read only on the transformers versions in :data:`TRANSFORMERS_TESTED`), for
  ``attn_implementation="eager"``: q and k after rotary embeddings, its additive mask.

Each call is attributed to the innermost watched module running it (forward pre- and post-hooks on the watched
modules, registered by ``start`` and removed by ``stop``); a call outside every watched module goes to the slot
``len(modules)`` ("outside"). Left out: GPT-2's ``reorder_and_upcast_attn`` path, ``bias_k``/``add_zero_attn`` of
``nn.MultiheadAttention`` (their calls are skipped), flash-attention packages that bypass torch's SDPA.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

#: log-spaced bins of |s|: ``PER_OCTAVE`` a factor of 2, from ``2**LOW`` (bin 0 also holds everything below) up
PER_OCTAVE = 8
LOW = -8
LOG_BINS = PER_OCTAVE * 24  # up to 2**16 (the last bin holds everything above)
#: logits recomputed in one block at most: ~1 MiB of float32 per temporary, so a block's dozen temporaries stay in
#: the CPU's cache (a 16x4x128x128 causal call on one thread: ~20 ms in blocks of 2**20, ~9 ms in blocks of 2**18)
BLOCK = 1 << 18
#: added to the logit of a key the mask leaves out (see :func:`_accumulate`)
FAR = -1e30
#: the Hugging Face transformers releases (major, minor) whose ``eager_attention_forward`` was tested
TRANSFORMERS_TESTED = ((4, 48), (5, 25))


@dataclass
class CallStats:
    """One attention call's statistics, per head (float64 tensors on the call's device)."""

    max_abs: Tensor  # (H,) the largest |s| over the allowed entries of the rows seen (-inf: none)
    entropy: Tensor  # (H,) sum over rows of the attention entropy (nats)
    uniform: Tensor  # (H,) sum over rows of log(allowed keys): the entropy of uniform rows
    rows: Tensor  # (H,) rows seen (with at least one allowed key)
    hist: Tensor  # (LOG_BINS,) counts of |s| on the log bins, all heads
    queries: int  # query positions of the call
    sampled: int  # query positions measured (== queries: exact)
    batch: int  # batch elements (all dims before the heads)


def bin_edges() -> list[float]:
    """The ``LOG_BINS + 1`` edges of the |s| histogram: ``2**(LOW + i / PER_OCTAVE)`` (bin 0 starts at 0)."""
    return [0.0] + [2.0 ** (LOW + i / PER_OCTAVE) for i in range(1, LOG_BINS)] + [math.inf]


def quantile_from_hist(counts: Sequence[float], q: float) -> float:
    """The ``q``-quantile of |s| from the log-bin ``counts``: geometric interpolation inside its bin (NaN: empty).

    Exact to within one bin (a factor ``2**(1/PER_OCTAVE)``, 9 %); below ``2**LOW`` it returns ``2**LOW``.
    """
    total = float(sum(counts))
    if total <= 0:
        return math.nan
    target, seen = q * total, 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= target:
            lo = LOW + i / PER_OCTAVE
            frac = (target - seen) / c
            return 2.0 ** (lo + frac / PER_OCTAVE) if i > 0 else 2.0**LOW
        seen += c
    return 2.0 ** (LOW + LOG_BINS / PER_OCTAVE)


def _heads_view(x: Tensor) -> Tensor:
    """``x`` as (N, H, L, E): the dim before the last two is the heads (4-D and more), else one head."""
    if x.dim() >= 4:
        return x.reshape(-1, *x.shape[-3:])
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(1, 1, *x.shape[-2:])


def attention_stats(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    max_queries: int = 256,
) -> CallStats:
    """The statistics of one attention call from its ``q`` (…, H, L, E) and ``k`` (…, Hk, S, E), as
    ``F.scaled_dot_product_attention`` takes them (see the module docstring); ``Hk < H`` (grouped-query attention)
    repeats each key head ``H // Hk`` times, as SDPA's ``enable_gqa`` does (``enable_gqa`` itself is accepted for
    the signature). Nothing of q or k is kept."""
    del enable_gqa  # the shapes say it
    with torch.no_grad():
        q4, k4 = _heads_view(q.detach()), _heads_view(k.detach())
        n, h, length, e = q4.shape
        if k4.shape[1] != h:
            k4 = k4.repeat_interleave(h // k4.shape[1], dim=1)
        if k4.shape[0] != n:
            k4 = k4.expand(n, *k4.shape[1:])
        s_len = k4.shape[2]
        scale = (1.0 / math.sqrt(e)) if scale is None else float(scale)
        device = q4.device
        idx = torch.arange(length, device=device)
        if length > max_queries:  # evenly spread, first and last included
            idx = torch.linspace(0, length - 1, max_queries, device=device).round().long().unique()
        m = idx.numel()
        mask = None
        if attn_mask is not None:
            mask = attn_mask.detach()
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
            mask = mask.reshape(-1, *mask.shape[-3:]) if mask.dim() > 4 else mask
            mask = mask.expand(n, h, length, s_len)
        causal = idx[:, None] >= torch.arange(s_len, device=device)[None, :] if is_causal else None  # (m, S)
        f64 = torch.float64
        max_abs = torch.full((h,), -math.inf, dtype=f64, device=device)
        entropy, uniform, rows = (torch.zeros(h, dtype=f64, device=device) for _ in range(3))
        hist = torch.zeros(LOG_BINS, dtype=f64, device=device)
        per = max(m * s_len, 1)  # logits per (batch element, head)
        heads_per = max(1, min(h, BLOCK // per))
        batch_per = max(1, BLOCK // (per * h)) if heads_per == h else 1
        for b0 in range(0, n, batch_per):
            b1 = min(n, b0 + batch_per)
            for h0 in range(0, h, heads_per):
                h1 = min(h, h0 + heads_per)
                qb = q4[b0:b1, h0:h1].index_select(2, idx).float()  # (nb, nh, m, E)
                kb = k4[b0:b1, h0:h1].float()  # (nb, nh, S, E)
                s = torch.matmul(qb, kb.transpose(-1, -2)).mul_(scale)  # (nb, nh, m, S)
                allowed, bias = None, None  # None: every key; else broadcastable to s
                if mask is not None:
                    mb = mask[b0:b1, h0:h1].index_select(2, idx)  # (nb, nh, m, S)
                    if mb.dtype == torch.bool:
                        allowed = mb
                    else:  # -inf, or the dtype's lowest value (Hugging Face's masks), leaves a key out
                        allowed = mb > torch.finfo(mb.dtype).min / 2
                        bias = mb.float()
                if causal is not None:
                    allowed = causal if allowed is None else allowed & causal
                _accumulate(s, bias, allowed, slice(h0, h1), max_abs, entropy, uniform, rows, hist)
        return CallStats(max_abs, entropy, uniform, rows, hist, length, m, n)


def _accumulate(
    s: Tensor,
    bias: Tensor | None,
    allowed: Tensor | None,
    heads: slice,
    max_abs: Tensor,
    entropy: Tensor,
    uniform: Tensor,
    rows: Tensor,
    hist: Tensor,
) -> None:
    """Adds one block of logits ``s`` (nb, nh, m, S) to the per-head accumulators (in place). ``allowed``: the
    keys each row may attend to, broadcastable to ``s`` (a causal (m, S) pattern is not expanded); None: all.

    A left-out key gets :data:`FAR` added (one broadcast add: a masked fill costs ~7x more on one CPU thread): far
    below every allowed logit, so its softmax weight is exactly 0, yet finite, so ``0 * (z - max)`` stays 0 where
    ``-inf`` would make it NaN."""
    a = s.abs()
    far, add = None, bias  # FAR where a key is left out (else 0), and what the mask adds to s: broadcastable to s
    if allowed is not None:
        far = torch.where(allowed, 0.0, FAR)
        add = far if bias is None else torch.where(allowed, bias, FAR)
    block_max = (a if far is None else a + far).amax(dim=(0, 2, 3)).double()
    block_max = block_max.masked_fill_(block_max <= FAR / 2, -math.inf)  # a head whose every key is left out
    max_abs[heads] = torch.maximum(max_abs[heads], block_max)
    z = s.add_(add) if add is not None else s
    if allowed is None:  # allowed keys per row (nb, nh, m)
        n_allowed = torch.full(s.shape[:-1], s.shape[-1], dtype=torch.long, device=s.device)
    else:
        n_allowed = allowed.sum(-1).expand(s.shape[:-1]).contiguous()
    # the entropy of p = softmax(z) per row: log(sum e) - sum(e * (z - top)) / sum(e), with e = exp(z - top)
    # (z clamped at -80, whose exp, ~1e-35, is still a normal float: an exp that underflows to 0 takes a CPU's slow
    # path, 6x the time; exp(-80) is then taken off again, so the keys left out and those below it add exactly 0)
    z = z.sub_(z.amax(-1, keepdim=True)).clamp_min_(-80.0)
    e = z.exp().sub_(torch.full((), -80.0, dtype=z.dtype, device=z.device).exp())
    total = e.sum(-1)
    ent = total.log().sub_(e.mul_(z).sum(-1).div_(total))  # (nb, nh, m)
    if allowed is not None:  # a row with no allowed key: entropy 0, and not counted below
        ent = ent.masked_fill_(n_allowed == 0, 0.0)
    entropy[heads] += ent.double().sum(dim=(0, 2))
    uniform[heads] += n_allowed.clamp_min(1).double().log().sum(dim=(0, 2))
    rows[heads] += (n_allowed > 0).double().sum(dim=(0, 2))
    # the bin of every |s|; the left-out ones and NaNs in an extra bin past the last: one counting pass, no gather
    pos = torch.log2(a.clamp_min_(2.0**LOW)).sub_(LOW).mul_(PER_OCTAVE).floor_().clamp_(0, LOG_BINS - 1)
    pos = pos.nan_to_num_(nan=LOG_BINS)
    if far is not None:
        pos = pos.sub_(far).clamp_max_(LOG_BINS)  # left out: -FAR, then the extra bin
    counts = torch.bincount(pos.flatten().long(), minlength=LOG_BINS + 1)
    hist += counts[:LOG_BINS].double()


# ------------------------------------------------------------------------------------------- the tap
OnCall = Callable[[int, Tensor, Tensor, "Tensor | None", bool, "float | None"], None]


def _sdpa_args(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    **_: Any,
) -> tuple[Tensor, Tensor, Tensor | None, bool, float | None]:
    """``F.scaled_dot_product_attention``'s documented signature: what the tap reads of a call."""
    return query, key, attn_mask, is_causal, scale


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _hf_namespace(module: nn.Module) -> Any:
    """The Hugging Face modeling module defining ``module``'s class when it has an ``eager_attention_forward``
    (on a tested transformers release), else None."""
    name = type(module).__module__
    if not name.startswith("transformers."):
        return None
    namespace = sys.modules.get(name)
    if namespace is None or not callable(getattr(namespace, "eager_attention_forward", None)):
        return None
    # the class is transformers', so transformers is imported already: read it, never import it (not a dependency)
    version = getattr(sys.modules.get("transformers"), "__version__", None)
    if version is None:
        return None
    lo, hi = TRANSFORMERS_TESTED
    return namespace if lo <= _minor(version) <= hi else None


class AttentionTap:
    """Sees the attention calls of ``modules`` while started: see the module docstring.

    Args:
        modules: the watched modules, in slot order; a call is attributed to the innermost one running it.
        on_call: ``on_call(slot, q, k, attn_mask, is_causal, scale)`` for each call (``attn_mask`` in SDPA's
            convention: boolean True takes part, a float one is added); ``slot == len(modules)``: outside them.
    """

    def __init__(self, modules: Sequence[nn.Module], on_call: OnCall) -> None:
        self.modules = list(modules)
        self.on_call = on_call
        self._stack: list[int] = []
        self._handles: list[RemovableHandle] = []
        self._saved: list[tuple[Any, str, Any]] = []  # (namespace, name, original)
        self._in_mha = 0  # inside a multi_head_attention_forward we measure ourselves
        self.calls_skipped = 0  # calls that could not be read (unsupported options)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def start(self) -> None:
        """Installs the wrappers and hooks (a started tap is left as it is)."""
        if self.active:
            return
        try:
            self._patch(F, "scaled_dot_product_attention", self._wrap_sdpa)
            self._patch(F, "multi_head_attention_forward", self._wrap_mha)
            for namespace in {id(ns): ns for m in self.modules if (ns := _hf_namespace(m)) is not None}.values():
                self._patch(namespace, "eager_attention_forward", self._wrap_hf_eager)
            for slot, module in enumerate(self.modules):
                self._handles.append(module.register_forward_pre_hook(self._push(slot)))
                self._handles.append(module.register_forward_hook(self._pop, always_call=True))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Restores every function and removes the hooks; safe to call at any time, and again."""
        while self._saved:
            namespace, name, original = self._saved.pop()
            setattr(namespace, name, original)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []
        self._in_mha = 0

    # -- the interception
    def _patch(self, namespace: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(namespace, name)
        self._saved.append((namespace, name, original))
        setattr(namespace, name, make(original))

    def _push(self, slot: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(slot)

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _slot(self) -> int:
        return self._stack[-1] if self._stack else len(self.modules)

    def _wrap_sdpa(self, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Tensor:
            if not self._in_mha:
                q, k, mask, causal, scale = _sdpa_args(*args, **kwargs)
                self.on_call(self._slot(), q, k, mask, bool(causal), scale)
            return original(*args, **kwargs)

        return scaled_dot_product_attention

    def _wrap_mha(self, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def multi_head_attention_forward(*args: Any, **kwargs: Any) -> Any:
            self._measure_mha(signature.bind(*args, **kwargs))
            self._in_mha += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._in_mha -= 1

        return multi_head_attention_forward

    def _measure_mha(self, bound: inspect.BoundArguments) -> None:
        bound.apply_defaults()
        a = bound.arguments
        if a["bias_k"] is not None or a["add_zero_attn"] or a["static_k"] is not None:
            self.calls_skipped += 1
            return
        query, key = a["query"], a["key"]  # (L, N, E) / (S, N, E), or unbatched (L, E)
        kpm = a["key_padding_mask"]
        if query.dim() == 2:
            query, key = query.unsqueeze(1), key.unsqueeze(1)
            kpm = kpm.unsqueeze(0) if kpm is not None else None
        heads, embed = a["num_heads"], a["embed_dim_to_check"]
        if a["use_separate_proj_weight"]:
            w_q, w_k = a["q_proj_weight"], a["k_proj_weight"]
        else:
            w_q, w_k, _ = a["in_proj_weight"].chunk(3)
        b_q = b_k = None
        if a["in_proj_bias"] is not None:
            b_q, b_k, _ = a["in_proj_bias"].chunk(3)
        with torch.no_grad():
            q = F.linear(query, w_q, b_q)  # (L, N, E)
            k = F.linear(key, w_k, b_k)  # (S, N, E)
        length, batch = q.shape[0], q.shape[1]
        q = q.reshape(length, batch, heads, embed // heads).permute(1, 2, 0, 3)  # (N, H, L, hd)
        k = k.reshape(k.shape[0], batch, heads, embed // heads).permute(1, 2, 0, 3)  # (N, H, S, hd)
        mask = _mha_mask(a["attn_mask"], kpm, batch, heads, length, k.shape[2])
        causal = bool(a["is_causal"]) and mask is None
        self.on_call(self._slot(), q, k, mask, causal, None)

    def _wrap_hf_eager(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def eager_attention_forward(
            module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *args: Any,
            **kwargs: Any,
        ) -> Any:  # fmt: skip
            scaling = kwargs.get("scaling", args[0] if args else None)
            self.on_call(self._slot(), query, key, attention_mask, False, scaling)
            return original(module, query, key, value, attention_mask, *args, **kwargs)

        return eager_attention_forward


def _mha_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, length: int, s_len: int
) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks (boolean True: *left out*; float: added) as one SDPA-style mask
    (boolean True takes part; float added), (N, H, L, S) or broadcastable to it."""
    out: Tensor | None = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (batch, 1, 1, s_len))):
        if m is None:
            continue
        if shape is not None:
            m = m.reshape(shape)
        elif m.dim() == 3:  # (N * H, L, S)
            m = m.reshape(batch, heads, length, s_len)
        m = torch.zeros_like(m, dtype=torch.float32).masked_fill(m, -math.inf) if m.dtype == torch.bool else m.float()
        out = m if out is None else out + m
    return out
