"""Tensor statistics computed on the tensor's device, reducible across ranks.

Every monitored tensor is summarised by two small float64 vectors:

- a *sum* vector (summed over micro-batches and ranks): finite count, non-finite count, sum,
  sum of squares, saturated count, dead units, units;
- a *max* vector (maxed over micro-batches and ranks): ``-min`` and ``max`` of the finite values.

Histograms are binned on the device against edges agreed by every rank (after the min/max
all-reduce), then the bin counts are summed. Nothing here synchronises with the host until
``StatsBuffer.reduce`` packs everything it returns into one tensor and copies it to the CPU once
(one device->host copy per monitor per logged step). Every rank runs the same collectives in the
same order whatever it holds; an error on one rank travels in the sum all-reduce and is raised on
every rank after it, so no rank waits forever for another.

Left out on purpose: exact quantiles (they do not reduce across ranks) and ``torch.histc``
(it raises on CUDA under ``Trainer(deterministic=True)``).
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
    if relu_like:
        rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else flat.reshape(1, -1)  # (B, units)
        alive = (rows > 0).any(0)  # (units,)
        parts.append(alive.numel() - alive.sum(dtype=torch.float64))
        parts.append(torch.full((), float(alive.numel()), dtype=torch.float64, device=device))
    else:
        parts.extend(torch.zeros(2, dtype=torch.float64, device=device).unbind())
    sums = torch.stack(parts)
    if not minmax:
        return sums, torch.full((2,), float("-inf"), dtype=torch.float64, device=device)
    nonfinite = finite.logical_not()
    lo = flat.masked_fill(nonfinite, float("inf")).min()
    hi = flat.masked_fill(nonfinite, float("-inf")).max()
    maxes = torch.stack([lo.neg(), hi]).to(torch.float64)
    return sums, maxes


def bin_counts(x: Tensor, lo: Tensor, hi: Tensor, bins: int) -> Tensor:
    """Counts the finite entries of ``x`` in ``bins`` equal bins over ``[lo, hi]`` (0-dim tensors), on device.

    Equivalent to ``bucketize`` against ``linspace(lo, hi, bins + 1)`` + ``bincount``, without the search.
    """
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    finite = torch.isfinite(flat)
    scale = bins / (hi - lo)
    idx = ((flat - lo.to(flat.dtype)) * scale.to(flat.dtype)).floor_().clamp_(0, bins - 1)
    idx = idx.masked_fill_(~finite, bins).long()  # non-finite go to an overflow bin, dropped below
    # scatter_add, not bincount: CUDA's bincount reads the max index back to the host
    counts = torch.zeros(bins + 1, dtype=torch.float64, device=flat.device)
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


@dataclass
class _Entry:
    sums: Tensor
    maxes: Tensor
    tensors: list[Tensor] = field(default_factory=list)


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
    ) -> None:
        """Adds a tensor's statistics; ``keep`` stores a detached copy for this step's histogram."""
        sums, maxes = local_stats(x, saturation, relu_like, minmax=keep)
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(sums, maxes)
        else:
            entry.sums = entry.sums + sums
            entry.maxes = torch.maximum(entry.maxes, maxes)
        if keep:
            # a copy: the module output may be modified in place later in the forward pass
            entry.tensors.append(x.detach().clone())

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

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        if not names:
            self.clear()
            if error is not None:
                raise error
            return {}
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
                        for t in entry.tensors if entry is not None else ():
                            counts[i] += bin_counts(t, lo[i], hi[i], bins)
            except Exception as e:
                error = error or e
                counts.zero_()
            if reducer is not None:
                counts = reducer(counts, "sum")
            parts += [edges.reshape(-1), counts.reshape(-1)]
        order = {n: i for i, n in enumerate(self._entries)}
        self.clear()
        # the one device->host copy of this logged step
        host = torch.cat(parts).tolist()
        if error is not None:
            raise error
        if host[k * N_SUM] > 0:
            raise MonitorRankError(
                f"{who}: the monitor failed on another rank this step (its error is in that rank's log);"
                " stopping every rank instead of waiting for it."
            )
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
