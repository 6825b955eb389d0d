"""callbacks._stats against numpy and hand-computed values; the device->host reads of a recorded step counted."""

import math
import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor, _stats
from callbacks._stats import (
    COUNT,
    DEAD,
    MAX,
    NEG_MIN,
    NONFINITE,
    SATURATED,
    SUM,
    SUMSQ,
    UNITS,
    MonitorRankError,
    Pool,
    summarise,
)
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer

CPU = torch.device("cpu")
#: the float64 sums of the CPU's small tensors are numpy's (another summation order than the tensor passes')
SUM_REL = 1e-12


def _same_vectors(a: list[float], b: list[float]) -> bool:
    """Sum vectors alike: the counts exact, the sum and the sum of squares to :data:`SUM_REL`."""
    pairs = enumerate(zip(a, b, strict=True))
    return all(x == pytest.approx(y, rel=SUM_REL) if i in (SUM, SUMSQ) else x == y for i, (x, y) in pairs)


def _same_summaries(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Summaries alike: everything exact (counts, min, max, saturation, dead units, histogram edges and counts) but
    the float64 sums and what is computed from them (mean, std), to :data:`SUM_REL`."""
    inexact = {"mean": 0.0, "std": 0.0, "sum": 0.0, "sum_squares": 0.0}
    if sorted(a) != sorted(b):
        return False
    for tag in a:
        x, y = a[tag], b[tag]
        if replace(x, **inexact) != replace(y, **inexact):
            return False
        if any(getattr(x, f) != pytest.approx(getattr(y, f), rel=SUM_REL, abs=1e-300) for f in inexact):
            return False
    return True


def _tensor(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        return torch.randn(7, 5, generator=g)
    if kind == "nan_inf":
        x = torch.randn(4, 6, generator=g)
        x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("-inf")
        return x
    if kind == "one":
        return torch.tensor([2.5])
    if kind == "int":
        return torch.arange(-3, 9).reshape(3, 4)
    if kind == "bf16":
        return torch.randn(3, 8, generator=g).bfloat16()
    if kind == "mixed":  # a large mean next to a small spread: the sum of squares needs float64 accumulation
        return 3.0 + 1e-3 * torch.randn(8, 5, 6, generator=g)
    if kind == "strided":  # not contiguous: summarised along its first dim, never copied whole
        return torch.randn(6, 40, generator=g).t()
    raise ValueError(kind)


@pytest.fixture(params=[True, False], ids=["cpu_path", "accelerator_path"])
def reads_free(request, monkeypatch):
    """Both ways of summarising: the CPU's (fast passes, a read of the sum of squares, masked passes only on
    NaN/inf) and an accelerator's (masked passes always, no read), the latter run here on CPU tensors."""
    if not request.param:
        monkeypatch.setattr(_stats, "reads_are_free", lambda device: False)
    return request.param


@pytest.mark.parametrize("kind", ["normal", "nan_inf", "one", "int", "bf16", "mixed", "strided"])
def test_summary_against_numpy(kind, reads_free):
    x = _tensor(kind)
    part = summarise(x)
    a = x.double().numpy().ravel()
    finite = a[np.isfinite(a)]
    sums, maxes = part.sums.tolist(), part.maxes.tolist()
    assert sums[COUNT] == finite.size and sums[NONFINITE] == a.size - finite.size
    assert sums[SUM] == pytest.approx(finite.sum(), rel=1e-9, abs=1e-9)
    assert sums[SUMSQ] == pytest.approx((finite**2).sum(), rel=1e-9)
    assert -maxes[NEG_MIN] == finite.min() and maxes[MAX] == finite.max()


@pytest.mark.parametrize("kind", ["normal", "nan_inf", "one", "int", "bf16", "mixed", "strided"])
def test_small_cpu_tensors_get_the_same_numbers_as_the_chunked_passes(kind, monkeypatch):
    # the CPU's small-tensor path (numpy, no tensor operation) reads the same counts, min and max, bit for bit, and the
    # same float64 sums to rounding (numpy sums in another order)
    x = _tensor(kind)
    fast = [summarise(x, saturation=(0.0, 0.97), relu_like=True), summarise(x, saturation=(0.5, 0.485))]
    monkeypatch.setattr(_stats, "_summarise_small", lambda *args: None)
    chunked = [summarise(x, saturation=(0.0, 0.97), relu_like=True), summarise(x, saturation=(0.5, 0.485))]
    for a, b in zip(fast, chunked, strict=True):
        assert _same_vectors(a.sums.tolist(), b.sums.tolist()) and a.maxes.tolist() == b.maxes.tolist()


@pytest.mark.parametrize("shape", [(100, 100), (3, 5000)])
def test_cpu_tensors_above_the_numpy_size_get_the_chunked_passes_numbers_bit_for_bit(shape, monkeypatch):
    # above NUMPY_MAX elements the small path runs the tensor passes' own operations: the very same numbers
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) + 0.25
    assert _stats.NUMPY_MAX < x.numel() <= _stats.CHUNK
    fast = [summarise(x, saturation=(0.0, 0.97), relu_like=True), summarise(x, saturation=(0.5, 0.485))]
    monkeypatch.setattr(_stats, "_summarise_small", lambda *args: None)
    chunked = [summarise(x, saturation=(0.0, 0.97), relu_like=True), summarise(x, saturation=(0.5, 0.485))]
    for a, b in zip(fast, chunked, strict=True):
        assert a.sums.tolist() == b.sums.tolist() and a.maxes.tolist() == b.maxes.tolist()
    assert fast[0].sums.tolist()[SATURATED] == (x.abs() > 0.97).sum().item()


def test_empty_tensor_is_the_identity_of_the_reductions():
    part = summarise(torch.empty(0, 3), histogram=True)
    assert part.sums.tolist() == [0.0] * 7 and part.maxes.tolist() == [-math.inf] * 3 and not part.grids


@pytest.mark.parametrize(
    ("values", "saturation", "expected"),
    [
        ([0.0, 0.5, 0.98, -0.99, 1.0, -0.2], (0.0, 0.97), 3),  # tanh: |y| > 0.97
        ([0.5, 0.99, 0.01, 0.984, 0.986, 0.2], (0.5, 0.485), 3),  # sigmoid: |y - 0.5| > 0.485 (|2y - 1| > 0.97)
        ([float("nan"), 0.99, 0.0], (0.0, 0.97), 1),  # NaN is not saturated
        ([float("nan"), 0.99, 0.5], (0.5, 0.485), 1),  # nor with a centre (a masked NaN is not a 0)
    ],
)
def test_saturation_count_by_hand(values, saturation, expected, reads_free):
    assert summarise(torch.tensor(values), saturation=saturation).sums[SATURATED].item() == expected


def test_dead_units_by_hand():
    # (batch 3, units 4): unit 0 positive once, unit 1 never (zeros and negatives), unit 2 always, unit 3 never
    x = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, -2.0, 3.0, 0.0], [0.0, -0.5, 1.0, -3.0]])
    sums = summarise(x, relu_like=True).sums
    assert (sums[DEAD].item(), sums[UNITS].item()) == (2, 4)
    # units are all dims but the batch: (B, T, C) has T * C units
    sums = summarise(torch.zeros(2, 3, 5), relu_like=True).sums
    assert (sums[DEAD].item(), sums[UNITS].item()) == (15, 15)


def _pool(tensors: list[torch.Tensor], bins: int, **kwargs: Any) -> Any:
    pool = Pool()
    for t in tensors:
        pool.add("x", t, histogram=True, **kwargs)
    return pool.reduce(["x"], {"x": bins}, CPU, None)["x"]


def _check_histogram(s: Any, values: np.ndarray, bins: int) -> None:
    """The histogram's promise: at most ``bins`` equal bins, edges multiples of the width, the first at or below
    the min and the last above it, and the counts numpy gives for those edges."""
    edges = np.asarray(s.edges)
    width = edges[1] - edges[0]
    assert 1 <= len(s.counts) <= max(bins, 2) and len(edges) == len(s.counts) + 1
    assert np.allclose(np.diff(edges), width, rtol=1e-12) and np.allclose(edges / width, np.round(edges / width))
    assert edges[0] <= values.min() and edges[-1] > values.max()
    assert s.counts == np.histogram(values, bins=edges)[0].tolist()


@pytest.mark.parametrize("bins", [1, 2, 7, 64])
@pytest.mark.parametrize("kind", ["normal", "nan_inf", "int", "bf16", "mixed", "strided"])
def test_histogram_against_numpy(kind, bins, reads_free):
    x = _tensor(kind)
    a = x.double().numpy().ravel()
    _check_histogram(_pool([x], bins), a[np.isfinite(a)], bins)


def test_histogram_uses_its_bins_well():
    """A standard normal sample in 64 bins uses most of them (the edges are round, not the min and max)."""
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    s = _pool([x], 64)
    assert 50 <= len(s.counts) <= 64


def test_pool_adds_calls_micro_batches_exactly_like_the_concatenation():
    g = torch.Generator().manual_seed(2)
    a, b, c = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) * 30, torch.randn(4, 3, generator=g) + 5
    pool = Pool()
    for t in (a, b, c):
        pool.add("x", t, histogram=True)
    s = pool.reduce(["x", "never"], {"x": 10, "never": 10}, CPU, None)
    assert list(s) == ["x"]  # a tag no rank saw is left out
    both = torch.cat([a, b, c]).double().numpy().ravel()
    x = s["x"]
    assert x.count == both.size and x.mean == pytest.approx(both.mean())
    assert x.std == pytest.approx(both.std(ddof=1))  # unbiased, like torch.std
    assert (x.min, x.max) == (both.min(), both.max())
    _check_histogram(x, both, 10)


def test_constant_tensor_gets_one_narrow_bin():
    s = _pool([torch.full((4,), 3.0)], 2)
    assert s.counts == [4.0] and s.edges[0] == 3.0 < s.edges[1] < 3.0 + 1e-6 and s.std < 1e-7


def test_tiny_values_near_the_smallest_normals_do_not_break_the_grid():
    x = torch.randn(100, generator=torch.Generator().manual_seed(3)) * 1e-38
    s = _pool([x], 16)
    a = x.double().numpy()
    assert sum(s.counts) == 100 and s.edges[0] <= a.min() and s.edges[-1] > a.max()


def test_large_tensors_are_summarised_in_bounded_chunks(monkeypatch):
    """A tensor larger than a chunk gives the same summary as in one piece (chunk made small here)."""
    x = torch.randn(50, 37, generator=torch.Generator().manual_seed(4))
    whole = _pool([x], 16, saturation=(0.0, 1.5), relu_like=True)
    monkeypatch.setattr(_stats, "CHUNK", 64)
    chunked = _pool([x], 16, saturation=(0.0, 1.5), relu_like=True)
    assert replace(chunked, sum=0.0, sum_squares=0.0, mean=0.0, std=0.0) == replace(
        whole, sum=0.0, sum_squares=0.0, mean=0.0, std=0.0
    )
    assert chunked.std == pytest.approx(whole.std, rel=1e-12) and chunked.mean == pytest.approx(whole.mean, abs=1e-12)


def _two_ranks(work: Any) -> list[Any]:
    """Runs ``work(rank, reducer)`` in two threads whose reducer sums/maxes their tensors, like an all-reduce."""
    barrier, slots = threading.Barrier(2), [None, None]
    results: list[Any] = [None, None]

    def reducer_for(rank: int) -> Any:
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait(timeout=10)
            out = slots[0] + slots[1] if op == "sum" else torch.maximum(slots[0], slots[1])
            barrier.wait(timeout=10)
            return out

        return reduce

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, reducer_for(rank))
        except Exception as e:  # the test looks at it
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def test_two_ranks_reduce_to_the_statistics_and_histogram_of_the_whole():
    halves = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3))
    halves[1] *= 40  # the ranks' ranges differ: their fine grids have different exponents
    halves[1, 0, 0] = float("nan")

    def work(rank: int, reducer: Any) -> Any:
        pool = Pool()
        pool.add("x", halves[rank], histogram=True)
        if rank == 0:
            pool.add("rank0_only", halves[rank], histogram=True)
        # the histogram tags in another order on each rank (a set's order differs between processes): the
        # reduction follows the order of `tags`, the same everywhere
        bins = {"x": 8, "rank0_only": 8} if rank == 0 else {"rank0_only": 8, "x": 8}
        return pool.reduce(["x", "rank0_only"], bins, CPU, reducer, rank=rank)

    r0, r1 = _two_ranks(work)
    # every rank gets the same summaries (but `order`, which is when this rank saw the tag first)
    assert {n: replace(v, order=0) for n, v in r0.items()} == {n: replace(v, order=0) for n, v in r1.items()}
    whole = halves.double().numpy().ravel()
    finite = whole[np.isfinite(whole)]
    x = r0["x"]
    assert (x.count, x.nonfinite, x.nonfinite_rank) == (finite.size, 1, 1)
    assert x.mean == pytest.approx(finite.mean()) and x.std == pytest.approx(finite.std(ddof=1))
    _check_histogram(x, finite, 8)
    assert r0["rank0_only"].count == 24


def test_an_error_on_one_rank_is_raised_on_every_rank_after_the_collectives():
    def work(rank: int, reducer: Any) -> Any:
        pool = Pool()
        pool.add("x", torch.ones(3), histogram=True)
        error = ValueError("hook failed on rank 1") if rank == 1 else None
        return pool.reduce(["x"], {"x": 4}, CPU, reducer, error=error, who="Probe", rank=rank)

    r0, r1 = _two_ranks(work)
    assert isinstance(r1, ValueError) and str(r1) == "hook failed on rank 1"
    assert isinstance(r0, MonitorRankError) and "Probe" in str(r0) and "another rank" in str(r0)


#: the Tensor methods that read a tensor's values on the host: on a GPU tensor each one is a blocking copy
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host (device-agnostic: on CPU they count what a GPU would
    copy). A ``TorchFunctionMode`` sees every Tensor method call without patching torch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        to_cpu = name == "to" and any(str(a) == "cpu" for a in [*args[1:], *(kwargs or {}).values()])
        if name in HOST_READS or to_cpu:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_an_accelerator_step_reads_the_host_once_even_with_nan(monkeypatch):
    """On an accelerator nothing is read until the reduction, which copies everything once, NaN/inf or not."""
    monkeypatch.setattr(_stats, "reads_are_free", lambda device: False)
    bad = torch.randn(10, 4)
    bad[1, 2] = float("nan")
    with HostReads() as reads:
        pool = Pool()
        for name, t in (("a", torch.randn(10, 4)), ("b", bad), ("c", torch.randn(3, 4))):
            pool.add(name, t, histogram=True, saturation=(0.0, 0.9), relu_like=True)
        s = pool.reduce(["a", "b", "c"], {"a": 16, "b": 16, "c": 16}, CPU, None)
    assert reads.count == 1 and s["b"].nonfinite == 1 and s["b"].count == 39


@pytest.mark.parametrize("histograms", [False, True], ids=["scalar_steps", "histogram_steps"])
def test_an_accelerator_fit_reads_the_host_once_per_monitor_per_recorded_step(tmp_path, histograms, monkeypatch):
    """A fit with the four monitors reads the host 4 times per recorded step more than the same fit without them
    (the accelerator's way of summarising, run on the CPU)."""
    monkeypatch.setattr(_stats, "reads_are_free", lambda device: False)
    every = 2
    counts = {}
    for with_monitors in (False, True):
        monitors = (
            [
                ActivationMonitor(every_n_steps=every, histogram_every_n_steps=every if histograms else 0),
                GradientMonitor(every_n_steps=every, histogram_every_n_steps=every if histograms else 0),
                ParameterMonitor(every_n_steps=every, histogram_every_n_steps=every if histograms else 0),
                UpdateRatioMonitor(every_n_steps=every),
            ]
            if with_monitors
            else []
        )
        # no figures: they are drawn from the CPU summaries, but keep the count about the step
        t = trainer(tmp_path / str(with_monitors), monitors, max_steps=6, log_every_n_steps=every)
        for m in monitors:
            m.recorder._draw = lambda *args, **kwargs: None  # (a monitor alone: its recorder draws)
        with HostReads() as reads:
            t.fit(TanhMLP(), fixed_loader(saturating_batch(), 6))
        counts[with_monitors] = reads.count
    recorded_steps = 4  # steps 0 (the picture at initialisation), 1, 3, 5 (5 is also the final step)
    assert counts[True] - counts[False] == 4 * recorded_steps


def test_small_cpu_tensors_kept_as_numbers_reduce_to_the_same_summaries(monkeypatch):
    # the pool keeps a small finite CPU tensor's vectors as Python numbers and reduces them without tensors; the same
    # adds through the tensor path give the same summaries, the float64 sums to rounding and the rest bit for bit (a
    # tag added twice, one never added, one with NaN that takes the masked tensor passes and meets the numbers of its
    # other call)
    g = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(32, 200, generator=g), torch.randn(30, 7, generator=g), torch.randn(50, generator=g)
    with_nan = c.clone()
    with_nan[4] = math.nan

    def reduced(nan: bool) -> dict[str, Any]:
        pool = Pool()
        pool.add("a", a, saturation=(0.0, 0.97))
        pool.add("b", b, relu_like=True)
        pool.add("b", b * 3)
        pool.add("c", c)
        if nan:
            pool.add("c", with_nan)
        return pool.reduce(["a", "b", "never", "c"], {}, CPU, None, rank=0)

    numbers, mixed = reduced(nan=False), reduced(nan=True)  # numbers only; numbers and a tensor
    monkeypatch.setattr(_stats, "_small_numbers", lambda *args: None)
    assert _same_summaries(numbers, reduced(nan=False)) and sorted(numbers) == ["a", "b", "c"]
    assert _same_summaries(mixed, reduced(nan=True))
    numbers = mixed
    assert numbers["b"].count == 2 * b.numel() and numbers["b"].max == pytest.approx(3 * b.max().item())
    assert numbers["c"].nonfinite == 1 and numbers["c"].count == 2 * c.numel() - 1 and numbers["c"].nonfinite_rank == 0
    assert numbers["a"].saturation == (a.abs() > 0.97).sum().item() / a.numel()


@pytest.mark.parametrize("scale", [1.0, 1e-30, 3e4])
def test_small_cpu_histograms_from_numbers_are_the_tensor_passes_histograms(monkeypatch, scale):
    # the grid exponent found in Python from the numbers is the tensor passes' one: the same edges and counts
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(32, 200, generator=g) * scale, torch.rand(30, 7, generator=g).double() * scale + 1.0]

    def reduced() -> dict[str, Any]:
        pool = Pool()
        for x in xs:
            pool.add("x", x, histogram=True)
            pool.add(f"alone{x.dtype}", x, histogram=True)
        tags = ["x", "alonetorch.float32", "alonetorch.float64"]
        return pool.reduce(tags, dict.fromkeys(tags, 32), CPU, None)

    numbers = reduced()
    monkeypatch.setattr(_stats, "_small_numbers", lambda *args: None)
    assert _same_summaries(numbers, reduced()) and all(s.counts and sum(s.counts) == s.count for s in numbers.values())


@pytest.mark.parametrize("scale", [1.0, 1e-30, 3e4])
def test_one_process_coarsens_host_grids_like_the_tensor_reduction(monkeypatch, scale):
    # one CPU process coarsens its small tensors' grids in numpy (no tensor made); the tensor reduction (the path of
    # several ranks: here an identity reducer) and the masked tensor passes give the same edges and counts, bit for
    # bit (and the same float64 sums to rounding), also for a tag whose calls took both paths (a NaN) and a histogram
    # tag never added
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(32, 200, generator=g) * scale, torch.randn(30, 7, generator=g).double() * scale - 2.5 * scale]
    with_nan = xs[0].clone()
    with_nan[3, 5] = math.nan
    tags = ["x", "y", "mixed", "never"]

    def reduced(reducer: Any, nan: bool) -> dict[str, Any]:
        pool = Pool()
        for x in xs:
            pool.add("x", x, histogram=True)
        pool.add("y", xs[1] * 3, histogram=True)
        pool.add("mixed", xs[1], histogram=True)
        if nan:
            pool.add("mixed", with_nan, histogram=True)
        return pool.reduce(tags, dict.fromkeys(tags, 20), CPU, reducer)

    identity = lambda t, op: t  # noqa: E731
    for nan in (False, True):
        host = reduced(None, nan)
        assert host == reduced(identity, nan)
        with monkeypatch.context() as m:
            m.setattr(_stats, "_small_numbers", lambda *args: None)
            assert _same_summaries(host, reduced(None, nan)) and _same_summaries(host, reduced(identity, nan))
        assert sorted(host) == ["mixed", "x", "y"]
        for s in host.values():
            assert sum(s.counts) == s.count and len(s.edges) == len(s.counts) + 1 <= 21
            assert s.edges[0] <= s.min and s.max < s.edges[-1]
        # the counts of the values themselves, from numpy, on the edges found
        y = (xs[1] * 3).numpy().ravel()
        assert host["y"].counts == np.histogram(y, bins=np.asarray(host["y"].edges))[0].astype(float).tolist()
