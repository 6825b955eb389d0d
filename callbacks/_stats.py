"""Tensor statistics computed on the tensor's device, reducible across ranks.

Every monitored tensor is summarised by two small float64 vectors:

- a *sum* vector (summed over micro-batches and ranks): finite count, non-finite count, sum,
  sum of squares, saturated count, dead units, units;
- a *max* vector (maxed over micro-batches and ranks): ``-min`` and ``max`` of the finite values.

Histograms are binned on the device against edges agreed by every rank (after the min/max
all-reduce), then the bin counts are summed. Nothing here synchronises with the host; the
caller moves the few reduced numbers to the CPU once per logged step.

Left out on purpose: exact quantiles (they do not reduce across ranks) and ``torch.histc``
(it raises on CUDA under ``Trainer(deterministic=True)``).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

# positions in the "sum" vector
COUNT, NONFINITE, SUM, SUMSQ, SATURATED, DEAD, UNITS = range(7)
N_SUM = 7
# positions in the "max" vector
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
    if not x.is_floating_point():
        x = x.float()
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
    return torch.bincount(idx, minlength=bins + 1)[:bins].to(torch.float64)


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


@dataclass
class _Entry:
    sums: Tensor
    maxes: Tensor
    tensors: list[Tensor] = field(default_factory=list)


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
    ) -> dict[str, Summary]:
        """Reduces over ranks (``reducer``) and returns the CPU summaries of the names seen anywhere.

        Every rank must call this with the same ``names`` and ``histograms``: a name not seen locally
        takes part in the collectives with zeros.
        """
        if not names:
            self.clear()
            return {}
        empty_max = torch.full((2,), float("-inf"), dtype=torch.float64, device=device)
        zeros = torch.zeros(N_SUM, dtype=torch.float64, device=device)
        sums = torch.stack([self._entries[n].sums if n in self._entries else zeros for n in names])
        maxes = torch.stack([self._entries[n].maxes if n in self._entries else empty_max for n in names])
        if reducer is not None:
            sums = reducer(sums, "sum")
            maxes = reducer(maxes, "max")
        edges = counts = None
        if histograms:
            lo, hi = -maxes[:, NEG_MIN], maxes[:, MAX]
            empty = sums[:, COUNT] == 0
            lo = torch.where(empty, 0.0, lo)
            hi = torch.where(empty, 1.0, hi)
            flat = hi <= lo  # a constant tensor: centre one unit-wide range on it
            lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
            steps = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=device)
            edges = lo[:, None] + (hi - lo)[:, None] * steps  # (K, bins + 1)
            counts = torch.zeros(len(names), bins, dtype=torch.float64, device=device)
            for k, n in enumerate(names):
                entry = self._entries.get(n)
                for t in entry.tensors if entry is not None else ():
                    counts[k] += bin_counts(t, lo[k], hi[k], bins)
            if reducer is not None:
                counts = reducer(counts, "sum")
            edges, counts = edges.cpu().tolist(), counts.cpu().tolist()
        self.clear()
        sums_l, maxes_l = sums.cpu().tolist(), maxes.cpu().tolist()
        out: dict[str, Summary] = {}
        for k, n in enumerate(names):
            s, m = sums_l[k], maxes_l[k]
            if s[COUNT] == 0 and s[NONFINITE] == 0:
                continue  # never called on any rank this step
            out[n] = summarize(s, m, edges[k] if edges else None, counts[k] if counts else None)
        return out


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
