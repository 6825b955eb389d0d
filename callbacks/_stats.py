"""Tensor statistics: a watched tensor is summarised where it is seen, then let go; summaries reduce across ranks.

Every watched tensor becomes a :class:`Partial`, a few small float64 tensors on its device:

- a *sum* vector (summed over module calls, micro-batches and ranks): finite count, non-finite count, sum,
  sum of squares, saturated count, dead units, units;
- a *max* vector (maxed likewise): ``-min`` and ``max`` of the finite values, and the exponent of its
  histogram grid;
- on histogram steps, the counts of its finite values on a fine grid of width ``2**e`` anchored at zero (bin
  ``k`` holds ``[k * 2**e, (k + 1) * 2**e)``), ``e`` the smallest exponent for which the tensor's range fits
  :data:`GRID` bins.

Nothing keeps the tensor: a recorded step holds no watched tensor longer than its hook, and the temporaries
of a summary are bounded by :data:`CHUNK` elements whatever the tensor's size (``tests/test_memory.py``).
Grids of different exponents nest (a bin of width ``2**E`` is the union of ``2**(E - e)`` bins of width
``2**e``), so the partial histograms of every call, micro-batch and rank add up exactly: :meth:`Pool.reduce`
takes the largest exponent and the global min/max, and coarsens every grid to at most ``bins`` equal bins of
width ``m * 2**E`` (an integer ``m``), their edges multiples of that width. They are exact histograms of
every value, with round edges: the first edge at or below the min, the last above the max.

NaN/inf are counted and left out of every other statistic. On the CPU, where reading a value costs nothing,
a tensor is summarised in few passes (sum, float64 norm, ``aminmax``) and again with masks only when its sum
of squares shows NaN/inf; a small one (one chunk) is kept as Python numbers (read in numpy up to
:data:`NUMPY_MAX` elements: the same counts, min and max, the float64 sums in numpy's order), its histogram grid's
exponent found in Python and its values binned in numpy, and one process reduces (and coarsens) a step of them
without making a tensor (on a small model a tensor operation's dispatch, and making and stacking the small tensors,
cost more than the passes); on an accelerator,
where a read would stall the device, the masked passes run always and nothing is read before :meth:`Pool.reduce`,
which copies everything of a step to the host once.
Every rank runs the same collectives in the same order whatever it holds; an error on one rank travels in
the sum all-reduce and is raised on every rank after it, so no rank waits forever for another.

Left out on purpose: exact quantiles (they do not reduce across ranks), and ``torch.histc`` or ``bincount``
on CUDA (the first raises under ``Trainer(deterministic=True)``, the second reads its max back to the host):
CUDA bins with ``scatter_add_``, the CPU with ``bincount``.
"""

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

# positions in the "sum" vector
COUNT, NONFINITE, SUM, SUMSQ, SATURATED, DEAD, UNITS = range(7)
N_SUM = 7
# positions in the "max" vector (NEG_RANK, -rank of the ranks with NaN/inf, is added by `Pool.reduce`)
NEG_MIN, MAX, EXPONENT, NEG_RANK = range(4)

#: bins of a tensor's fine histogram grid (its range fits them; coarsened to the requested bins at the reduce)
GRID = 1024
#: elements summarised at a time: the temporaries of a summary never exceed this many elements
CHUNK = 1 << 20

Reducer = Callable[[Tensor, str], Tensor]
_F64 = torch.float64


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a value on ``device`` costs nothing (the CPU), so a summary may branch on one."""
    return device.type == "cpu"


def _float_dtype(x: Tensor) -> torch.dtype:
    # integers, and 16-bit floats whose squares would round (bf16 keeps 8 bits), are summarised in float32
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _chunks(x: Tensor) -> list[Tensor]:
    """``x`` as flat chunks of at most :data:`CHUNK` elements (one row at least), in its float dtype.

    A contiguous tensor is split as it lies; any other along its first dim, so that no copy of the whole is made.
    """
    dtype = _float_dtype(x)
    if x.is_contiguous() or x.ndim == 0:
        flat = x.reshape(-1)
        parts = [flat] if flat.numel() <= CHUNK else list(flat.split(CHUNK))
    else:
        rows = max(1, CHUNK // max(x[0].numel(), 1))
        parts = [part.reshape(-1) for part in x.split(rows)]
    return [p.to(dtype) for p in parts]


def _dead_units(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(dead units, units)``: positions over all dims but the first (the batch) never positive in ``x``."""
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)  # (B, units)
    alive = torch.zeros(rows.shape[1], dtype=torch.bool, device=x.device)
    step = max(1, CHUNK // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        alive |= (rows[start : start + step] > 0).any(0)
    units = torch.full((), float(alive.numel()), dtype=_F64, device=x.device)
    return units - alive.sum(dtype=_F64), units


def _moments(x: Tensor, saturation: tuple[float, float] | None, masked: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``[count, nonfinite, sum, sum of squares, saturated]`` and the finite min and max, over chunks.

    ``masked`` leaves NaN/inf out (and counts them); otherwise the tensor is taken to be finite, and a NaN/inf
    shows as a non-finite sum of squares.
    """
    device = x.device
    acc = torch.zeros(5, dtype=_F64, device=device)
    lo = torch.full((), math.inf, dtype=_F64, device=device)
    hi = torch.full((), -math.inf, dtype=_F64, device=device)
    zero = torch.zeros((), dtype=_F64, device=device)
    for chunk in _chunks(x):
        finite = torch.isfinite(chunk) if masked else None
        if finite is not None:
            n = finite.sum(dtype=_F64)
            values = chunk.where(finite, 0.0)
            c_lo = chunk.masked_fill(~finite, math.inf).min()
            c_hi = chunk.masked_fill(~finite, -math.inf).max()
        else:
            n = torch.full((), float(chunk.numel()), dtype=_F64, device=device)
            values = chunk
            c_lo, c_hi = torch.aminmax(chunk)
        parts = [n, chunk.numel() - n, values.sum(dtype=_F64), torch.linalg.vector_norm(values, dtype=_F64).square()]
        if saturation is not None:
            center, limit = saturation
            saturated = ((values - center).abs_() if center != 0 else values.abs()).gt_(limit)
            parts.append((saturated.logical_and_(finite) if finite is not None else saturated).sum(dtype=_F64))
        else:
            parts.append(zero)
        acc += torch.stack(parts)
        lo, hi = torch.minimum(lo, c_lo.to(_F64)), torch.maximum(hi, c_hi.to(_F64))
    return acc, lo, hi


#: the finest grid exponent per float dtype: below it, values are near the dtype's smallest normal numbers
_MIN_EXPONENT = {torch.float32: -100.0, torch.float64: -1000.0}
#: mantissa bits kept below a tensor's largest magnitude, so that bin indices are exact in its dtype
_MANTISSA = {torch.float32: 23, torch.float64: 52}


def _grid_exponent(lo: Tensor, hi: Tensor, dtype: torch.dtype) -> Tensor:
    """The fine grid's exponent ``e`` (float64, 0-dim): the smallest with ``floor(hi/2**e) - floor(lo/2**e) < GRID``,
    no finer than the data's own precision (:data:`_MANTISSA` bits below its largest magnitude: bin indices stay
    exact integers in ``dtype``), and ``-inf`` when there is no finite value (the identity of the max)."""
    width = (hi - lo).clamp_min(0.0)
    big = torch.maximum(lo.abs(), hi.abs())
    e = torch.maximum(torch.log2(width / (GRID - 2)).ceil(), torch.log2(big).ceil() - _MANTISSA[dtype])
    e = torch.where(torch.isfinite(e), e, 0.0).clamp_min(_MIN_EXPONENT[dtype])  # (a tensor of zeros: any grid)
    scale = torch.exp2(-e)
    e = e + ((hi * scale).floor() - (lo * scale).floor() > GRID - 1).to(_F64)  # log2's rounding: one step at most
    return torch.where(torch.isfinite(lo) & torch.isfinite(hi), e, -math.inf)


def _grid_exponent_of(lo: float, hi: float, dtype: torch.dtype) -> float:
    """:func:`_grid_exponent` of finite Python numbers, in Python (the CPU's small tensors: no tensor operation)."""
    width, big = max(hi - lo, 0.0), max(abs(lo), abs(hi))
    e = max(
        math.ceil(math.log2(width / (GRID - 2))) if width > 0 else -math.inf,
        math.ceil(math.log2(big)) - _MANTISSA[dtype] if big > 0 else -math.inf,
    )
    e = max(float(e) if math.isfinite(e) else 0.0, _MIN_EXPONENT[dtype])
    scale = 2.0**-e
    return e + float(math.floor(hi * scale) - math.floor(lo * scale) > GRID - 1)  # log2's rounding: one step at most


def _grid_counts(x: Tensor, lo: Tensor, e: Tensor, masked: bool) -> tuple[Tensor, Tensor]:
    """Counts of ``x``'s finite values on the grid ``2**e`` from bin ``k0 = floor(lo / 2**e)``: ``(k0, counts)``."""
    scale = torch.exp2(-e)
    k0 = (lo * scale).floor()
    k0 = torch.where(torch.isfinite(k0), k0, 0.0)
    counts = torch.zeros(GRID + 1, dtype=_F64, device=x.device)  # the last bin collects NaN/inf, dropped
    dtype = _float_dtype(x)
    s, k = scale.to(dtype), k0.to(dtype)
    for chunk in _chunks(x):
        pos = (chunk * s).floor_().sub_(k)  # exact: |chunk * s| < 2**mantissa (see `_grid_exponent`)
        if masked:
            pos.masked_fill_(~torch.isfinite(chunk), GRID)
        if reads_are_free(x.device):
            counts += torch.bincount(pos.int().clamp_(0, GRID), minlength=GRID + 1).to(_F64)
        else:  # scatter_add, not bincount: CUDA's bincount reads the max index back to the host
            idx = pos.long().clamp_(0, GRID)
            counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=_F64))
    return k0, counts[:GRID]


def _host_grid_counts(x: Tensor, lo: float, e: float) -> tuple[float, float, np.ndarray]:
    """:func:`_grid_counts` of a finite CPU tensor of one chunk, in numpy: ``(e, k0, counts)`` with Python numbers and
    the float64 counts. The same float operations in the same dtype (a product, a floor, a difference), so the same
    bins; numpy's passes cost half of torch's on a small model's tensors."""
    scale = 2.0**-e
    k0 = math.floor(lo * scale)  # (lo finite: the tensor is)
    dtype = _float_dtype(x)
    a = x.detach().reshape(-1).to(dtype).numpy()
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    pos = np.floor(a * np_dtype(scale))
    pos -= np_dtype(k0)
    idx = np.clip(pos, 0, GRID).astype(np.intp)
    return e, float(k0), np.bincount(idx, minlength=GRID + 1)[:GRID].astype(np.float64)


#: a fine histogram grid: ``(exponent, k0, counts (GRID,))``, tensors on the device, or (the CPU's small tensors,
#: :class:`Pool`) Python numbers and a numpy array
Grid = tuple[Tensor, Tensor, Tensor] | tuple[float, float, np.ndarray]


@dataclass
class Partial:
    """The summary of one tensor (or several, pooled), on its device: see the module docstring."""

    sums: Tensor | list[float]  # (N_SUM,) float64; Python numbers on the CPU's small-tensor path (`Pool.add`)
    maxes: Tensor | list[float]  # (3,) float64: -min, max, grid exponent (-inf where there is no grid)
    grids: list[Grid] = field(default_factory=list)


@dataclass
class Packed:
    """Vectors reduced with a step's tags, in the same two collectives: ``sums`` summed and ``maxes`` maxed over
    ranks (float64, on the reduction's device; their sizes the same on every rank)."""

    sums: Tensor
    maxes: Tensor

    @staticmethod
    def empty(device: torch.device) -> "Packed":
        return Packed(torch.zeros(0, dtype=_F64, device=device), torch.zeros(0, dtype=_F64, device=device))


def summarise(
    x: Tensor,
    saturation: tuple[float, float] | None = None,
    relu_like: bool = False,
    histogram: bool = False,
) -> Partial:
    """Summarises one tensor into a :class:`Partial` (float64, on x's device), holding nothing of it.

    Args:
        x: any tensor; non-finite entries are counted and left out of the other statistics.
        saturation: ``(center, limit)``: an entry is saturated when ``|x - center| > limit``.
        relu_like: count "dead" units: positions (over all dims but the first, the batch) that are
            never positive in this tensor.
        histogram: also count the values on the fine grid (histogram steps only).
    """
    x = x.detach()
    device = x.device
    none = torch.full((), -math.inf, dtype=_F64, device=device)
    if x.numel() == 0:
        return Partial(torch.zeros(N_SUM, dtype=_F64, device=device), torch.stack([none, none, none]))
    masked = not reads_are_free(device)  # on an accelerator: never read, mask always
    if not masked and not histogram and x.numel() <= CHUNK:
        fast = _summarise_small(x, saturation, relu_like)
        if fast is not None:
            return fast
    moments, lo, hi = _moments(x, saturation, masked)
    if not masked and not math.isfinite(moments[SUMSQ].item()):  # NaN/inf somewhere (a CPU read: free)
        masked = True
        moments, lo, hi = _moments(x, saturation, masked)
    dead = _dead_units(x) if relu_like else (none.new_zeros(()), none.new_zeros(()))
    sums = torch.cat([moments, torch.stack(dead)])
    if not histogram:
        return Partial(sums, torch.stack([-lo, hi, none]))
    e = _grid_exponent(lo, hi, _float_dtype(x))
    k0, counts = _grid_counts(x, lo, e, masked)
    return Partial(sums, torch.stack([-lo, hi, e]), [(e, k0, counts)])


def _summarise_small(x: Tensor, saturation: tuple[float, float] | None, relu_like: bool) -> Partial | None:
    """:func:`summarise` of a finite CPU tensor of one chunk, without a histogram (:func:`_small_numbers`: numpy for a
    small model's tensors, whose reads cost less than a tensor operation's dispatch). None when NaN/inf show (the
    masked passes then)."""
    numbers = _small_numbers(x, saturation, relu_like)
    if numbers is None:
        return None
    return Partial(torch.tensor(numbers[0], dtype=_F64), torch.tensor(numbers[1], dtype=_F64))


def _small_numbers(
    x: Tensor, saturation: tuple[float, float] | None, relu_like: bool
) -> tuple[list[float], list[float]] | None:
    """The sum and max vectors of :func:`_summarise_small` as Python numbers (reads are free on the CPU), which
    :class:`Pool` keeps as they are: a tensor made of them costs more than the passes themselves.

    A tensor of at most :data:`NUMPY_MAX` elements is read in numpy (:func:`_numpy_numbers`), a larger one in few
    tensor passes. None when NaN/inf show (the masked passes then)."""
    if x.numel() <= NUMPY_MAX:
        numbers = _numpy_numbers(x, saturation, relu_like)
        if numbers is not False:
            return numbers
    flat = x.detach().reshape(-1).to(_float_dtype(x))
    norm = torch.linalg.vector_norm(flat, dtype=_F64).item()
    sum_squares = norm * norm
    if not math.isfinite(sum_squares):
        return None
    lo, hi = torch.aminmax(flat)
    saturated = 0.0
    if saturation is not None:
        center, limit = saturation
        outside = ((flat - center).abs_() if center != 0 else flat.abs()).gt_(limit)
        saturated = outside.sum(dtype=_F64).item()
    dead, units = (t.item() for t in _dead_units(x)) if relu_like else (0.0, 0.0)
    sums = [float(flat.numel()), 0.0, flat.sum(dtype=_F64).item(), sum_squares, saturated, dead, units]
    return sums, [-lo.item(), hi.item(), -math.inf]


#: the largest tensor :func:`_small_numbers` reads in numpy: where a tensor operation's dispatch costs more than its
#: arithmetic, and below the size at which numpy's BLAS (the sum of squares is a dot product) starts threads
NUMPY_MAX = 1 << 13


def _numpy_numbers(
    x: Tensor, saturation: tuple[float, float] | None, relu_like: bool
) -> tuple[list[float], list[float]] | bool | None:
    """:func:`_small_numbers` in numpy. The counts, the min and max and the saturated and dead counts are the tensor
    passes', bit for bit; the sum and the sum of squares are float64 sums too, in numpy's order (they may differ
    from the tensor passes' in the last bits). None when NaN/inf show; False for a tensor numpy cannot view (one
    with a lazy negation, say)."""
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(_float_dtype(x))
    try:
        a = flat.numpy()
    except (RuntimeError, TypeError):
        return False
    a64 = a if a.dtype == np.float64 else a.astype(np.float64)
    sum_squares = float(np.dot(a64, a64))
    if not math.isfinite(sum_squares):
        return None
    saturated = 0.0
    if saturation is not None:
        center, limit = saturation  # compared in the tensor's dtype, as the tensor passes compare
        saturated = float(np.count_nonzero(np.abs(a - center if center != 0 else a) > limit))
    dead = units = 0.0
    if relu_like:
        rows = a.reshape(x.shape[0], -1) if x.ndim >= 2 else a.reshape(1, -1)  # (B, units)
        units = float(rows.shape[1])
        dead = units - float(np.count_nonzero((rows > 0).any(axis=0)))
    sums = [float(a.size), 0.0, float(a64.sum()), sum_squares, saturated, dead, units]
    return sums, [-float(a.min()), float(a.max()), -math.inf]


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
    edges: list[float] | None = None  # len(counts) + 1 equal-width edges
    counts: list[float] | None = None
    order: int = 0  # when this rank first saw the tag this step (forward order for module outputs)
    nonfinite_rank: int = -1  # the lowest rank that saw NaN/inf, -1 if none

    def scaled(self, factor: float) -> "Summary":
        """The summary of the values times ``factor > 0`` (counts and shares unchanged)."""
        edges = [e * factor for e in self.edges] if self.edges is not None else None
        return replace(
            self,
            mean=self.mean * factor,
            std=self.std * factor,
            min=self.min * factor,
            max=self.max * factor,
            sum=self.sum * factor,
            sum_squares=self.sum_squares * factor * factor,
            edges=edges,
        )


#: seconds a rank waits before raising the error of another rank, so that rank's own error is printed first
RANK_ERROR_GRACE_S = 10.0


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class MonitorRankError(RuntimeError):
    """A monitor failed on another rank: raised on this one so that the whole run stops instead of hanging."""


class Pool:
    """The summaries of one recorded step, per tag, pooled over module calls and micro-batches."""

    def __init__(self) -> None:
        self._entries: dict[str, Partial] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tag: str) -> bool:
        return tag in self._entries

    def clear(self) -> None:
        self._entries.clear()

    def add(
        self,
        tag: str,
        x: Tensor,
        histogram: bool = False,
        saturation: tuple[float, float] | None = None,
        relu_like: bool = False,
    ) -> None:
        """Summarises ``x`` (:func:`summarise`) into ``tag``'s entry; ``x`` is not kept.

        A small finite CPU tensor is kept as Python numbers (:func:`_small_numbers`), the same numbers
        :func:`summarise` puts in its tensors, and its histogram on the same grid."""
        part = None
        if x.numel() <= CHUNK and x.numel() and reads_are_free(x.device):
            numbers = _small_numbers(x, saturation, relu_like)
            if numbers is not None:
                part = Partial(*numbers)
                if histogram:  # the same grid as `summarise`'s, its exponent found from the numbers
                    lo, hi = -part.maxes[NEG_MIN], part.maxes[MAX]  # type: ignore[index]
                    e = _grid_exponent_of(lo, hi, _float_dtype(x))
                    part.maxes[EXPONENT] = e  # type: ignore[index]
                    part.grids = [_host_grid_counts(x, lo, e)]
        if part is None:
            part = summarise(x, saturation, relu_like, histogram)
        entry = self._entries.get(tag)
        if entry is None:
            self._entries[tag] = part
        elif isinstance(entry.sums, list) and isinstance(part.sums, list):
            entry.sums = [a + b for a, b in zip(entry.sums, part.sums, strict=True)]
            entry.maxes = [max(a, b) for a, b in zip(entry.maxes, part.maxes, strict=True)]  # (finite or -inf)
            entry.grids += part.grids
        else:
            device = part.sums.device if isinstance(part.sums, Tensor) else entry.sums.device  # type: ignore[union-attr]
            entry.sums = _vector(entry.sums, device) + _vector(part.sums, device)
            entry.maxes = torch.maximum(_vector(entry.maxes, device), _vector(part.maxes, device))
            entry.grids += part.grids

    def reduce(
        self,
        tags: Sequence[str],
        histograms: Mapping[str, int],
        device: torch.device,
        reducer: Reducer | None,
        error: BaseException | None = None,
        who: str = "a monitor",
        rank: int = 0,
    ) -> dict[str, Summary]:
        """Reduces over ranks (``reducer``) and returns the CPU summaries of the tags seen anywhere.

        ``histograms``: the tags with a histogram, and its bins (at most; at least 2). Every rank must call this
        with the same ``tags`` and ``histograms``: a tag not seen locally takes part in the collectives with
        zeros. ``error``: this rank failed earlier in the step; the collectives still run (with this rank's
        zeros), then every rank raises: this one its own error, the others a :class:`MonitorRankError` naming
        ``who``. One device->host copy. The pool is cleared.

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        return self.reduce_with(tags, histograms, Packed.empty(device), device, reducer, error, who, rank)[0]

    def reduce_with(
        self,
        tags: Sequence[str],
        histograms: Mapping[str, int],
        packed: "Packed",
        device: torch.device,
        reducer: Reducer | None,
        error: BaseException | None = None,
        who: str = "a monitor",
        rank: int = 0,
    ) -> tuple[dict[str, Summary], tuple[list[float], list[float]]]:
        """:meth:`reduce`, with ``packed``'s vectors summed and maxed in the same collectives as the tags'.

        Returns the summaries and the reduced ``(sums, maxes)`` of ``packed``, on the CPU. Every rank must pass
        vectors of the same sizes (the probes' declared states: see ``callbacks.probes.base.Probe.add_state``).

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        order = {t: i for i, t in enumerate(self._entries)}
        hist = {t: max(histograms[t], 2) for t in tags if t in histograms}  # in `tags`' order: the same on every rank
        n_sums, n_maxes = packed.sums.numel(), packed.maxes.numel()
        try:
            if not tags and not n_sums and not n_maxes:
                if error is not None:
                    raise error
                return {}, ([], [])
            host = self._reduce(tags, hist, packed, device, reducer, error, who, rank)
        finally:
            self.clear()
        k, h = len(tags), len(hist)
        at = k * N_SUM + 1
        extra_sums, at = host[at : at + n_sums], at + n_sums
        maxes = [host[at + 4 * i : at + 4 * i + 4] for i in range(k)]
        at += 4 * k
        extra_maxes, at = host[at : at + n_maxes], at + n_maxes
        sizes, at = host[at : at + h], at + h
        places, edges_at = {}, at
        counts_at = edges_at + sum(b + 1 for b in hist.values())
        for j, (t, b) in enumerate(hist.items()):
            places[t] = (int(sizes[j]), edges_at, counts_at)
            edges_at, counts_at = edges_at + b + 1, counts_at + b
        out: dict[str, Summary] = {}
        for i, t in enumerate(tags):
            s = host[i * N_SUM : (i + 1) * N_SUM]
            if s[COUNT] == 0 and s[NONFINITE] == 0:
                continue  # never seen on any rank this step
            summary = _summary(s, maxes[i])
            if t in places and summary.count > 0:
                n, e, c = places[t]
                summary.edges, summary.counts = host[e : e + n + 1], host[c : c + n]
            summary.order = order.get(t, len(order) + i)
            out[t] = summary
        return out, (extra_sums, extra_maxes)

    def _reduce(
        self,
        tags: Sequence[str],
        histograms: Mapping[str, int],
        packed: "Packed",
        device: torch.device,
        reducer: Reducer | None,
        error: BaseException | None,
        who: str,
        rank: int,
    ) -> list[float]:
        """The collectives and the one host copy of :meth:`reduce`.

        Raises:
            MonitorRankError: when another rank reported an error.
        """
        k = len(tags)
        entries = [self._entries.get(t) for t in tags]
        if reducer is None and error is None and _host_only(entries, packed):
            return _host_vectors(entries, rank, [(self._entries.get(t), b) for t, b in histograms.items()])
        index = {t: i for i, t in enumerate(tags)}
        sums = torch.zeros(k, N_SUM, dtype=_F64, device=device)
        maxes = torch.full((k, 4), -math.inf, dtype=_F64, device=device)
        try:
            if k:  # one stack per vector (a tag no call added: the identities)
                none_sums, none_maxes = sums[0], maxes[0, :3]
                sums = torch.stack([_vector(e.sums, device) if e is not None else none_sums for e in entries])
                seen = torch.stack([_vector(e.maxes, device) if e is not None else none_maxes for e in entries])
                # the lowest rank with NaN/inf wins the max of -rank
                neg_rank = torch.where(sums[:, NONFINITE] > 0, float(-rank), -math.inf)
                maxes = torch.cat([seen, neg_rank.to(_F64).unsqueeze(1)], dim=1)
        except Exception as e:  # join the collectives anyway; raised below
            error = error or e
            sums.zero_()
            maxes.fill_(-math.inf)
        extra_sums, extra_maxes = packed.sums, packed.maxes
        if error is not None:  # this rank's zeros (the identities) instead of what it may have half-filled
            extra_sums, extra_maxes = torch.zeros_like(extra_sums), torch.full_like(extra_maxes, -math.inf)
        flag = torch.full((1,), float(error is not None), dtype=_F64, device=device)
        all_sums = torch.cat([sums.reshape(-1), flag, extra_sums])
        all_maxes = torch.cat([maxes.reshape(-1), extra_maxes])
        if reducer is not None:
            all_sums = reducer(all_sums, "sum")
            all_maxes = reducer(all_maxes, "max")
        maxes = all_maxes[: k * 4].reshape(k, 4)
        parts = [all_sums, all_maxes]
        if histograms:
            sizes, edges, counts = [], [], []
            for t, bins in histograms.items():
                entry = self._entries.get(t) if error is None else None
                try:
                    n, e, c = _coarsen(maxes[index[t]], entry.grids if entry is not None else [], bins)
                except Exception as err:  # join the collectives anyway; raised below
                    error = error or err
                    n = torch.zeros((), dtype=_F64, device=device)
                    e, c = (
                        torch.zeros(bins + 1, dtype=_F64, device=device),
                        torch.zeros(bins, dtype=_F64, device=device),
                    )
                sizes.append(n)
                edges.append(e)
                counts.append(c)
            all_counts = torch.cat(counts)
            if reducer is not None:
                all_counts = reducer(all_counts, "sum")  # the edges are the same on every rank (reduced min/max)
            parts += [torch.stack(sizes), *edges, all_counts]
        # the one device->host copy of this recorded step
        host = torch.cat(parts).tolist()
        failed = error is not None or host[k * N_SUM] > 0
        if failed and _global_rank() > 0:
            # rank 0 raises first, the others a moment later: Lightning's launcher kills every rank as soon as a child
            # process (rank > 0) exits with an error, which could take rank 0 down before its traceback is out, while
            # the children outlive rank 0's error long enough to print theirs
            time.sleep(RANK_ERROR_GRACE_S)
        if error is not None:
            raise error
        if host[k * N_SUM] > 0:
            raise MonitorRankError(
                f"{who}: the monitor failed on another rank this step (its error is in that rank's log);"
                " stopping every rank instead of waiting for it."
            )
        return host


def _vector(x: Tensor | list[float], device: torch.device) -> Tensor:
    """``x`` as a float64 tensor on ``device``, copied only when it is elsewhere (a model split over devices)."""
    if isinstance(x, list):
        return torch.tensor(x, dtype=_F64, device=device)
    return x if x.device == device else x.to(device)


def _host_only(entries: Sequence[Partial | None], packed: Packed) -> bool:
    """Whether a step's vectors and grids are all Python numbers already (the CPU's small tensors, nothing
    declared)."""
    return (
        not packed.sums.numel()
        and not packed.maxes.numel()
        and all(
            e is None or (isinstance(e.sums, list) and isinstance(e.maxes, list) and all(_on_host(g) for g in e.grids))
            for e in entries
        )
    )


def _on_host(grid: Grid) -> bool:
    return isinstance(grid[2], np.ndarray)


def _host_vectors(
    entries: Sequence[Partial | None], rank: int, histograms: Sequence[tuple[Partial | None, int]] = ()
) -> list[float]:
    """What :meth:`Pool._reduce` returns, laid out the same, for one process whose vectors and grids are Python
    numbers already and nothing declared (:func:`_host_only`): no tensor is made, no reduction is needed.
    ``histograms``: each histogram tag's entry and bins, in the tags' order."""
    sums: list[float] = []
    maxes: list[float] = []
    for e in entries:
        s = e.sums if e is not None else [0.0] * N_SUM
        m = e.maxes if e is not None else [-math.inf] * 3
        sums += s  # type: ignore[arg-type]
        maxes += [*m, float(-rank) if s[NONFINITE] > 0 else -math.inf]  # type: ignore[misc]
    out = [*sums, 0.0, *maxes]
    if histograms:
        coarse = [
            _coarsen_host(e.maxes if e is not None else [-math.inf] * 3, e.grids if e is not None else [], b)  # type: ignore[arg-type]
            for e, b in histograms
        ]
        out += [n for n, _, _ in coarse]
        for _, edges, _ in coarse:
            out += edges
        for _, _, counts in coarse:
            out += counts
    return out


def _coarsen(maxes: Tensor, grids: list[Grid], bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """The final histogram from the global min/max/exponent (``maxes``, reduced) and this rank's fine grids.

    Returns ``(n, edges (bins + 1,), counts (bins,))`` on the device, the first ``n`` bins used. Width
    ``m * 2**E``, ``E`` the largest grid exponent and ``m`` a small integer giving at most ``bins`` bins;
    every fine bin falls in exactly one final bin (integer arithmetic, exact).
    """
    device = maxes.device
    lo, hi, big_e = -maxes[NEG_MIN], maxes[MAX], maxes[EXPONENT]
    ok = torch.isfinite(lo) & torch.isfinite(hi) & torch.isfinite(big_e)  # some finite value on some rank
    lo, hi, big_e = (torch.where(ok, v, 0.0) for v in (lo, hi, big_e))
    scale = torch.exp2(-big_e)
    k_lo, k_hi = (lo * scale).floor(), (hi * scale).floor()
    # the smallest m among a few candidates from m_lo up, and m_hi, which always gives at most `bins` bins
    m_lo = torch.ceil((k_hi - k_lo) / bins).clamp_min(1.0)
    m_hi = torch.div(k_hi - k_lo, bins - 1, rounding_mode="floor") + 1
    ms = torch.cat([m_lo + torch.arange(8, dtype=_F64, device=device), m_hi.reshape(1)])
    sizes = torch.div(k_hi, ms, rounding_mode="floor") - torch.div(k_lo, ms, rounding_mode="floor") + 1
    m = ms[(sizes <= bins).to(torch.int8).argmax()]
    first = torch.div(k_lo, m, rounding_mode="floor")  # the final bin index of the first edge
    n = torch.div(k_hi, m, rounding_mode="floor") - first + 1
    width = m * torch.exp2(big_e)
    edges = (first + torch.arange(bins + 1, dtype=_F64, device=device)) * width
    counts = torch.zeros(bins, dtype=_F64, device=device)
    for e, k0, fine in (_grid_tensors(g, device) for g in grids):
        shift = (big_e - e).clamp(0, 62).long()
        k = (k0.long() + torch.arange(fine.numel(), device=device)).bitwise_right_shift(shift)  # floor
        idx = torch.div(k, m.long(), rounding_mode="floor") - first.long()
        counts.scatter_add_(0, idx.clamp_(0, bins - 1), fine)  # (out of range: empty fine bins only)
    return torch.where(ok, n, 0.0), edges, counts


def _grid_tensors(grid: Grid, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A grid as tensors on ``device`` (a host grid is made of Python numbers and numpy: see :class:`Pool`)."""
    if not _on_host(grid):
        return grid  # type: ignore[return-value]
    e, k0, counts = grid
    return (
        torch.tensor(e, dtype=_F64, device=device),
        torch.tensor(k0, dtype=_F64, device=device),
        torch.from_numpy(counts).to(device),  # type: ignore[arg-type]
    )


def _coarsen_host(maxes: list[float], grids: list[Grid], bins: int) -> tuple[float, list[float], list[float]]:
    """:func:`_coarsen` of one process's host grids (:func:`_host_only`) in Python numbers and numpy: the same float64
    operations (floor divisions included: Python's float ``//`` and torch's floor division share one definition), the
    same integer bin arithmetic, so the same ``(n, edges, counts)``."""
    lo, hi, big_e = -maxes[NEG_MIN], maxes[MAX], maxes[EXPONENT]
    ok = math.isfinite(lo) and math.isfinite(hi) and math.isfinite(big_e)
    if not ok:
        lo = hi = big_e = 0.0
    scale = 2.0**-big_e
    k_lo, k_hi = float(math.floor(lo * scale)), float(math.floor(hi * scale))
    m_lo = max(float(math.ceil((k_hi - k_lo) / bins)), 1.0)
    m_hi = (k_hi - k_lo) // (bins - 1) + 1
    m = m_hi
    for candidate in [m_lo + i for i in range(8)]:
        if k_hi // candidate - k_lo // candidate + 1 <= bins:
            m = candidate
            break
    first = k_lo // m
    n = k_hi // m - first + 1
    width = m * 2.0**big_e
    edges = ((first + np.arange(bins + 1, dtype=np.float64)) * width).tolist()
    counts = np.zeros(bins, dtype=np.float64)
    m_int, first_int = int(m), int(first)
    for e, k0, fine in grids:  # (host grids only: see `_host_only`)
        shift = int(min(max(big_e - e, 0.0), 62.0))  # type: ignore[operator]
        k = (int(k0) + np.arange(len(fine), dtype=np.int64)) >> shift  # type: ignore[arg-type]
        idx = np.clip(k // m_int - first_int, 0, bins - 1)
        counts += np.bincount(idx, weights=fine, minlength=bins)  # type: ignore[arg-type]
    return (n if ok else 0.0), edges, counts.tolist()


def _summary(s: list[float], m: list[float]) -> Summary:
    """Turns reduced sum / max vectors into a :class:`Summary` (without its histogram)."""
    n = s[COUNT]
    mean = s[SUM] / n if n > 0 else math.nan
    var = (s[SUMSQ] - s[SUM] * s[SUM] / n) / (n - 1) if n > 1 else 0.0  # unbiased, like torch.std
    return Summary(
        count=int(n),
        nonfinite=int(s[NONFINITE]),
        mean=mean,
        std=max(var, 0.0) ** 0.5 if n > 0 else math.nan,
        min=-m[NEG_MIN] if n > 0 else 0.0,
        max=m[MAX] if n > 0 else 0.0,
        sum=s[SUM],
        sum_squares=s[SUMSQ],
        saturation=s[SATURATED] / n if n > 0 else None,
        dead=s[DEAD] / s[UNITS] if s[UNITS] > 0 else None,
        nonfinite_rank=-int(m[NEG_RANK]) if math.isfinite(m[NEG_RANK]) else -1,
    )
