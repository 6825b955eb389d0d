"""Tensor statistics computed on the tensor's device, reducible across ranks.

Every monitored tensor is summarised by two small float64 vectors:

- a *sum* vector (summed over micro-batches and ranks): finite count, non-finite count, sum,
  sum of squares, saturated count, dead units, units;
- a *max* vector (maxed over micro-batches and ranks): ``-min`` and ``max`` of the finite values.

Histograms are binned on the device against edges agreed by every rank (after the min/max
all-reduce), then the bin counts are summed. Nothing here synchronises with the host until
``StatsBuffer.reduce`` packs everything it returns into one tensor and copies it to the CPU once
(one device->host copy per monitor per logged step). The buffer takes the fast path
(:func:`fast_stats`: no NaN/inf masking); a tensor holding NaN/inf makes its sums non-finite, seen after
that copy, and only then are the NaN-aware statistics (:func:`local_stats`) of those names recomputed from
the tensors the buffer held, collectives and copy again: a second copy on steps with NaN/inf, never on a
finite one. Every rank runs the same collectives in the same order whatever it holds; an error on one
rank travels in the sum all-reduce and is raised on every rank after it, so no rank waits forever for
another.

Left out on purpose: exact quantiles (they do not reduce across ranks), and ``torch.histc`` or
``bincount`` on CUDA (the first raises under ``Trainer(deterministic=True)``, the second reads its max
back to the host): CUDA bins with ``scatter_add_``, the CPU with ``bincount``.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# positions in the "sum" vector
COUNT, NONFINITE, SUM, SUMSQ, SATURATED, DEAD, UNITS = range(7)
N_SUM = 7
# positions in the "max" vector (the third, -rank of the ranks with NaN/inf, only in `StatsBuffer.reduce`)
NEG_MIN, MAX = range(2)

Reducer = Callable[[Tensor, str], Tensor]


def _dead_units(x: Tensor, relu_like: bool) -> list[Tensor]:
    """``[dead units, units]`` (float64, on x's device): positions over all dims but the first (the batch) that
    are never positive in ``x``; two zeros when ``relu_like`` is False."""
    if not relu_like:
        return list(torch.zeros(2, dtype=torch.float64, device=x.device).unbind())
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)  # (B, units)
    alive = (rows > 0).any(0)  # (units,)
    units = torch.full((), float(alive.numel()), dtype=torch.float64, device=x.device)
    return [units - alive.sum(dtype=torch.float64), units]


def local_stats(
    x: Tensor, saturation: tuple[float, float] | None = None, relu_like: bool = False, minmax: bool = True
) -> tuple[Tensor, Tensor]:
    """Summarises one tensor into a ``(7,)`` sum vector and a ``(2,)`` max vector (float64, on x's device).

    Args:
        x: any tensor; non-finite entries are counted and left out of the other statistics.
        saturation: ``(center, limit)``: an entry is saturated when ``|x - center| > limit``.
        relu_like: count "dead" units: positions (over all dims but the first, the batch) that are
            never positive in this tensor.
        minmax: compute the min and max (only histograms need them); when False the max vector is
            ``-inf`` (the identity of the max reduction).
    """
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # integers, and 16-bit floats whose squares would round (bf16 keeps 8 bits)
    flat = x.reshape(-1)
    device = x.device
    if flat.numel() == 0:
        return torch.zeros(N_SUM, dtype=torch.float64, device=device), torch.full(
            (2,), float("-inf"), dtype=torch.float64, device=device
        )
    # few, fused ops: on logged steps each costs a kernel launch (or a few microseconds on CPU)
    finite = torch.isfinite(flat)
    count = finite.sum(dtype=torch.float64)
    xf = torch.where(finite, flat, 0.0)
    total = xf.sum(dtype=torch.float64)
    sumsq = xf.square().sum(dtype=torch.float64)
    parts = [count, flat.numel() - count, total, sumsq]
    if saturation is not None:
        center, limit = saturation
        centered = flat - center if center != 0 else flat
        parts.append((centered.abs() > limit).logical_and_(finite).sum(dtype=torch.float64))
    else:
        parts.append(torch.zeros((), dtype=torch.float64, device=device))
    parts.extend(_dead_units(x, relu_like))
    sums = torch.stack(parts)
    if not minmax:
        return sums, torch.full((2,), float("-inf"), dtype=torch.float64, device=device)
    nonfinite = finite.logical_not()
    lo = flat.masked_fill(nonfinite, float("inf")).min()
    hi = flat.masked_fill(nonfinite, float("-inf")).max()
    maxes = torch.stack([lo.neg(), hi]).to(torch.float64)
    return sums, maxes


def _as_float(x: Tensor) -> Tensor:
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # integers, and 16-bit floats whose squares would round (bf16 keeps 8 bits)
    return x


def fast_stats(
    x: Tensor, saturation: tuple[float, float] | None = None, relu_like: bool = False, minmax: bool = True
) -> tuple[Tensor, Tensor]:
    """:func:`local_stats` for a tensor without NaN/inf, in fewer passes (no masking).

    On a tensor with NaN/inf the sum of squares (and the min/max) come out non-finite, which is how
    :meth:`StatsBuffer.reduce` tells; the counts and sums are then meaningless and
    :func:`local_stats` gives the right ones. (float32 values cannot overflow the float64 sums.)

    Args:
        x: any tensor.
        saturation: as in :func:`local_stats`.
        relu_like: as in :func:`local_stats`.
        minmax: as in :func:`local_stats`.
    """
    x = _as_float(x)
    flat = x.reshape(-1)
    device = x.device
    n = flat.numel()
    if n == 0:
        return local_stats(x, saturation, relu_like, minmax)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    parts = [torch.full((), float(n), dtype=torch.float64, device=device), zero]
    parts.append(flat.sum(dtype=torch.float64))
    parts.append(torch.linalg.vector_norm(flat, dtype=torch.float64).square())  # float64 accumulation
    if saturation is not None:
        center, limit = saturation
        centered = (flat - center).abs_() if center != 0 else flat.abs()
        parts.append((centered > limit).sum(dtype=torch.float64))
    else:
        parts.append(zero)
    parts.extend(_dead_units(x, relu_like))
    sums = torch.stack(parts)
    if not minmax:
        return sums, torch.full((2,), float("-inf"), dtype=torch.float64, device=device)
    lo, hi = torch.aminmax(flat)
    return sums, torch.stack([lo.neg(), hi]).to(torch.float64)


def bin_counts(x: Tensor, lo: Tensor, hi: Tensor, bins: int, finite: bool = False) -> Tensor:
    """Counts the finite entries of ``x`` in ``bins`` equal bins over ``[lo, hi]`` (0-dim tensors), on device.

    Equivalent to ``bucketize`` against ``linspace(lo, hi, bins + 1)`` + ``bincount``, without the search.
    ``finite``: the caller knows ``x`` has no NaN/inf (skips the masking).
    """
    flat = _as_float(x).reshape(-1)
    scale = bins / (hi - lo)
    # clamped after the integer cast: NaN/inf (in x or in lo/hi) land in some bin instead of out of range,
    # so that binning a tensor wrongly said finite gives wrong counts (recomputed by the caller), never an
    # error. Values outside [lo, hi] go to the edge bins (up to 2**63 bins away; `reduce` never has any).
    pos = (flat - lo.to(flat.dtype)).mul_(scale.to(flat.dtype)).floor_()
    if flat.device.type == "cpu":
        idx = pos.int().clamp_(0, bins - 1)  # int32: bincount takes it, half the bytes of int64
        if not finite:
            idx = idx[torch.isfinite(flat)]
        return torch.bincount(idx, minlength=bins).to(torch.float64)
    idx = pos.long().clamp_(0, bins - 1)  # scatter_add_ wants int64
    return _scatter_counts(idx, None if finite else torch.isfinite(flat), bins)


def _scatter_counts(idx: Tensor, finite: Tensor | None, bins: int) -> Tensor:
    """``bincount(idx[finite], minlength=bins)`` in float64 without reading the host (CUDA's path)."""
    if finite is not None:
        idx = idx.masked_fill_(~finite, bins)  # non-finite go to an overflow bin, dropped below
    # scatter_add, not bincount: CUDA's bincount reads the max index back to the host
    counts = torch.zeros(bins + 1, dtype=torch.float64, device=idx.device)
    counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts[:bins]


@dataclass
class Summary:
    """Reduced statistics of one tag, on the CPU (plain Python numbers and small lists)."""

    count: int
    nonfinite: int
    mean: float
    std: float
    min: float
    max: float
    sum: float
    sum_squares: float
    saturation: float | None = None
    dead: float | None = None
    edges: list[float] | None = None  # bins + 1 edges
    counts: list[float] | None = None  # bins counts
    order: int = 0  # when this rank first saw the tag this step (forward order for module outputs)
    nonfinite_rank: int = -1  # the lowest rank that saw NaN/inf, -1 if none


Source = Tensor | Callable[[], Tensor]


@dataclass
class _Entry:
    sums: Tensor
    maxes: Tensor
    tensors: list[Tensor] = field(default_factory=list)  # copies kept for this step's histogram
    # what each `add` summarised, to recompute NaN-aware: (tensor or how to make it, saturation, relu_like, minmax)
    sources: list[tuple[Source, tuple[float, float] | None, bool, bool]] = field(default_factory=list)


class MonitorRankError(RuntimeError):
    """A monitor failed on another rank: raised on this one so that the whole run stops instead of hanging."""


class StatsBuffer:
    """Accumulates local statistics per name over the micro-batches of one logged step."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def add(
        self,
        name: str,
        x: Tensor,
        keep: bool,
        saturation: tuple[float, float] | None = None,
        relu_like: bool = False,
        recompute: Callable[[], Tensor] | None = None,
    ) -> None:
        """Adds a tensor's statistics (:func:`fast_stats`); ``keep`` stores a detached copy for this step's histogram.

        Until :meth:`reduce`, the buffer holds ``x`` (or its copy), or ``recompute`` when given (a function
        that makes ``x`` again, for a temporary not worth holding): on a step where some tensor has
        NaN/inf, :meth:`reduce` recomputes that name's statistics from them.
        """
        sums, maxes = fast_stats(x, saturation, relu_like, minmax=keep)
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(sums, maxes)
        else:
            entry.sums = entry.sums + sums
            entry.maxes = torch.maximum(entry.maxes, maxes)
        source: Source
        if keep:
            # a copy: the module output may be modified in place later in the forward pass
            source = x.detach().clone()
            entry.tensors.append(source)
        else:
            source = recompute if recompute is not None else x.detach()
        entry.sources.append((source, saturation, relu_like, keep))

    def _recompute(self, names: set[str]) -> None:
        """Replaces the fast statistics of ``names`` by the NaN-aware ones (:func:`local_stats`)."""
        for n in names:
            entry = self._entries.get(n)
            if entry is None:
                continue
            parts = [
                local_stats(src() if callable(src) else src, sat, relu, minmax)
                for src, sat, relu, minmax in entry.sources
            ]
            entry.sums = torch.stack([p[0] for p in parts]).sum(0)
            entry.maxes = torch.stack([p[1] for p in parts]).amax(0)

    def reduce(
        self,
        names: list[str],
        device: torch.device,
        reducer: Reducer | None,
        histograms: bool,
        bins: int,
        error: BaseException | None = None,
        who: str = "a monitor",
        rank: int = 0,
    ) -> dict[str, Summary]:
        """Reduces over ranks (``reducer``) and returns the CPU summaries of the names seen anywhere.

        Every rank must call this with the same ``names`` and ``histograms``: a name not seen locally
        takes part in the collectives with zeros. ``error``: this rank failed earlier in the step; the
        collectives still run (with this rank's zeros), then every rank raises: this one its own error,
        the others a :class:`MonitorRankError` naming ``who``.

        One device->host copy when every tensor was finite; when the reduced sums of some names are not
        (NaN/inf in a tensor of them on some rank, which every rank sees in the same reduced sums), their
        NaN-aware statistics are recomputed and everything reduced and copied once more.

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        if not names:
            self.clear()
            if error is not None:
                raise error
            return {}
        order = {n: i for i, n in enumerate(self._entries)}
        k = len(names)
        try:
            host = self._reduce_once(names, device, reducer, histograms, bins, error, who, rank, set())
            finite = [math.isfinite(host[i * N_SUM + SUM]) and math.isfinite(host[i * N_SUM + SUMSQ]) for i in range(k)]
            bad = {n for i, n in enumerate(names) if not finite[i]}
            if bad:  # only on a step with NaN/inf; every rank has the same `bad` (from the reduced sums)
                failed: BaseException | None = None
                try:
                    self._recompute(bad)
                except Exception as e:  # join the collectives anyway; raised by `_reduce_once`
                    failed = e
                host = self._reduce_once(names, device, reducer, histograms, bins, failed, who, rank, bad)
        finally:
            self.clear()
        at = k * N_SUM + 1
        maxes_l = [host[at + 3 * i : at + 3 * i + 3] for i in range(k)]
        at += 3 * k
        out: dict[str, Summary] = {}
        for i, n in enumerate(names):
            s = host[i * N_SUM : (i + 1) * N_SUM]
            if s[COUNT] == 0 and s[NONFINITE] == 0:
                continue  # never called on any rank this step
            e = c = None
            if histograms:
                e = host[at + i * (bins + 1) : at + (i + 1) * (bins + 1)]
                c0 = at + k * (bins + 1)
                c = host[c0 + i * bins : c0 + (i + 1) * bins]
            summary = summarize(s, maxes_l[i][:2], e, c)
            summary.order = order.get(n, len(order) + i)
            summary.nonfinite_rank = -int(maxes_l[i][2]) if math.isfinite(maxes_l[i][2]) else -1
            out[n] = summary
        return out

    def _reduce_once(
        self,
        names: list[str],
        device: torch.device,
        reducer: Reducer | None,
        histograms: bool,
        bins: int,
        error: BaseException | None,
        who: str,
        rank: int,
        nonfinite: set[str],
    ) -> list[float]:
        """The collectives and the one host copy of :meth:`reduce`; ``nonfinite``: names binned NaN-aware.

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        k = len(names)
        sums = torch.zeros(k, N_SUM, dtype=torch.float64, device=device)
        maxes = torch.full((k, 3), float("-inf"), dtype=torch.float64, device=device)
        try:
            for i, n in enumerate(names):
                entry = self._entries.get(n)
                if entry is not None:
                    sums[i] = entry.sums
                    maxes[i, :2] = entry.maxes
            # the lowest rank with NaN/inf wins the max of -rank
            maxes[:, 2] = torch.where(sums[:, NONFINITE] > 0, float(-rank), float("-inf"))
        except Exception as e:  # join the collectives anyway; raised below
            error = error or e
            sums.zero_()
            maxes.fill_(float("-inf"))
        flag = torch.full((1,), float(error is not None), dtype=torch.float64, device=device)
        packed = torch.cat([sums.reshape(-1), flag])
        if reducer is not None:
            packed = reducer(packed, "sum")
            maxes = reducer(maxes, "max")
        sums = packed[:-1].reshape(k, N_SUM)
        parts = [packed, maxes.reshape(-1)]
        if histograms:
            lo, hi = -maxes[:, NEG_MIN], maxes[:, MAX]
            empty = sums[:, COUNT] == 0
            lo = torch.where(empty, 0.0, lo)
            hi = torch.where(empty, 1.0, hi)
            flat = hi <= lo  # a constant tensor: centre one unit-wide range on it
            lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
            steps = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=device)
            edges = lo[:, None] + (hi - lo)[:, None] * steps  # (K, bins + 1)
            counts = torch.zeros(k, bins, dtype=torch.float64, device=device)
            try:
                if error is None:
                    for i, n in enumerate(names):
                        entry = self._entries.get(n)
                        finite = n not in nonfinite  # else the fast pass's (garbage) counts are dropped
                        for t in entry.tensors if entry is not None else ():
                            counts[i] += bin_counts(t, lo[i], hi[i], bins, finite=finite)
            except Exception as e:
                error = error or e
                counts.zero_()
            if reducer is not None:
                counts = reducer(counts, "sum")
            parts += [edges.reshape(-1), counts.reshape(-1)]
        # the one device->host copy of this logged step (a second on a step with NaN/inf)
        host = torch.cat(parts).tolist()
        if error is not None:
            raise error
        if host[k * N_SUM] > 0:
            raise MonitorRankError(
                f"{who}: the monitor failed on another rank this step (its error is in that rank's log);"
                " stopping every rank instead of waiting for it."
            )
        return host

    def order(self) -> list[str]:
        """The names added this step, in the order first added."""
        return list(self._entries)


def summarize(
    s: list[float], m: list[float], edges: list[float] | None = None, counts: list[float] | None = None
) -> Summary:
    """Turns reduced sum / max vectors into a :class:`Summary`."""
    n = s[COUNT]
    mean = s[SUM] / n if n > 0 else float("nan")
    var = (s[SUMSQ] - s[SUM] * s[SUM] / n) / (n - 1) if n > 1 else 0.0  # unbiased, like torch.std
    return Summary(
        count=int(n),
        nonfinite=int(s[NONFINITE]),
        mean=mean,
        std=max(var, 0.0) ** 0.5 if n > 0 else float("nan"),
        min=-m[NEG_MIN] if n > 0 else 0.0,
        max=m[MAX] if n > 0 else 0.0,
        sum=s[SUM],
        sum_squares=s[SUMSQ],
        saturation=s[SATURATED] / n if n > 0 else None,
        dead=s[DEAD] / s[UNITS] if s[UNITS] > 0 else None,
        edges=edges,
        counts=counts,
    )
