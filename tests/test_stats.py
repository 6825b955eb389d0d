"""callbacks._stats against numpy and hand-computed values; the monitors' device->host copies counted."""

import math
import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
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
    StatsBuffer,
    _scatter_counts,
    bin_counts,
    fast_stats,
    local_stats,
)
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer


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
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "nan_inf", "one", "int", "bf16"])
def test_local_stats_against_numpy(kind):
    x = _tensor(kind)
    sums, maxes = local_stats(x)
    a = x.double().numpy().ravel()
    finite = a[np.isfinite(a)]
    assert sums[COUNT].item() == finite.size
    assert sums[NONFINITE].item() == a.size - finite.size
    assert sums[SUM].item() == pytest.approx(finite.sum(), rel=1e-6, abs=1e-9)
    assert sums[SUMSQ].item() == pytest.approx((finite**2).sum(), rel=1e-6)
    assert -maxes[NEG_MIN].item() == finite.min() and maxes[MAX].item() == finite.max()


def test_empty_tensor_is_the_identity_of_the_reductions():
    sums, maxes = local_stats(torch.empty(0, 3))
    assert sums.tolist() == [0.0] * 7 and maxes.tolist() == [-math.inf, -math.inf]


@pytest.mark.parametrize(
    ("values", "saturation", "expected"),
    [
        ([0.0, 0.5, 0.98, -0.99, 1.0, -0.2], (0.0, 0.97), 3),  # tanh: |y| > 0.97
        ([0.5, 0.99, 0.01, 0.984, 0.986, 0.2], (0.5, 0.485), 3),  # sigmoid: |y - 0.5| > 0.485 (|2y - 1| > 0.97)
        ([float("nan"), 0.99, 0.0], (0.0, 0.97), 1),  # NaN is not saturated
    ],
)
def test_saturation_count_by_hand(values, saturation, expected):
    sums, _ = local_stats(torch.tensor(values), saturation=saturation)
    assert sums[SATURATED].item() == expected


def test_dead_units_by_hand():
    # (batch 3, units 4): unit 0 positive once, unit 1 never (zeros and negatives), unit 2 always, unit 3 never
    x = torch.tensor([[1.0, 0.0, 2.0, -1.0], [-1.0, -2.0, 3.0, 0.0], [0.0, -0.5, 1.0, -3.0]])
    sums, _ = local_stats(x, relu_like=True)
    assert (sums[DEAD].item(), sums[UNITS].item()) == (2, 4)
    # units are all dims but the batch: (B, T, C) has T * C units
    sums, _ = local_stats(torch.zeros(2, 3, 5), relu_like=True)
    assert (sums[DEAD].item(), sums[UNITS].item()) == (15, 15)


@pytest.mark.parametrize("bins", [1, 4, 64])
def test_bin_counts_against_numpy_histogram(bins):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    x[:3] = float("nan")
    lo, hi = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    ours = bin_counts(x.clamp(-1.5, 2.0), lo, hi, bins)
    a = x.clamp(-1.5, 2.0).numpy()
    expected, _ = np.histogram(a[np.isfinite(a)], bins=bins, range=(-1.5, 2.0))
    assert ours.tolist() == expected.tolist()


def test_buffer_pools_micro_batches_like_the_concatenation():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) * 3
    buffer = StatsBuffer()
    buffer.add("x", a, keep=True)
    buffer.add("x", b, keep=True)
    s = buffer.reduce(["x", "never"], torch.device("cpu"), None, histograms=True, bins=10)
    assert list(s) == ["x"]  # a name no rank saw is left out
    both = torch.cat([a, b]).double().numpy().ravel()
    x = s["x"]
    assert x.count == both.size and x.mean == pytest.approx(both.mean())
    assert x.std == pytest.approx(both.std(ddof=1))  # unbiased, like torch.std
    assert (x.min, x.max) == (both.min(), both.max())
    expected, edges = np.histogram(both, bins=10, range=(both.min(), both.max()))
    assert x.counts == expected.tolist() and x.edges == pytest.approx(edges.tolist())


def test_constant_tensor_gets_a_unit_wide_range():
    buffer = StatsBuffer()
    buffer.add("c", torch.full((4,), 3.0), keep=True)
    s = buffer.reduce(["c"], torch.device("cpu"), None, histograms=True, bins=2)["c"]
    assert (s.edges[0], s.edges[-1], s.counts, s.std) == (2.5, 3.5, [0.0, 4.0], 0.0)


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


def test_two_ranks_reduce_to_the_statistics_of_the_whole():
    halves = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(3))
    halves[1, 0, 0] = float("nan")

    def work(rank: int, reducer: Any) -> Any:
        buffer = StatsBuffer()
        buffer.add("x", halves[rank], keep=True)
        if rank == 0:
            buffer.add("rank0_only", halves[rank], keep=True)
        return buffer.reduce(["x", "rank0_only"], torch.device("cpu"), reducer, True, 8, rank=rank)

    r0, r1 = _two_ranks(work)
    # every rank gets the same summaries (but `order`, which is when this rank saw the name first)
    assert {n: replace(v, order=0) for n, v in r0.items()} == {n: replace(v, order=0) for n, v in r1.items()}
    whole = halves.double().numpy().ravel()
    finite = whole[np.isfinite(whole)]
    x = r0["x"]
    assert (x.count, x.nonfinite, x.nonfinite_rank) == (finite.size, 1, 1)
    assert x.mean == pytest.approx(finite.mean()) and x.std == pytest.approx(finite.std(ddof=1))
    assert sum(x.counts) == finite.size
    assert r0["rank0_only"].count == 24


def test_an_error_on_one_rank_is_raised_on_every_rank_after_the_collectives():
    def work(rank: int, reducer: Any) -> Any:
        buffer = StatsBuffer()
        buffer.add("x", torch.ones(3), keep=True)
        error = ValueError("hook failed on rank 1") if rank == 1 else None
        return buffer.reduce(["x"], torch.device("cpu"), reducer, True, 4, error=error, who="Probe", rank=rank)

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


def test_reduce_reads_the_host_once():
    buffer = StatsBuffer()
    for name in ("a", "b", "c"):
        buffer.add(name, torch.randn(10, 4), keep=True, saturation=(0.0, 0.9), relu_like=True)
    with HostReads() as reads:
        buffer.reduce(["a", "b", "c"], torch.device("cpu"), None, histograms=True, bins=16)
    assert reads.count == 1


@pytest.mark.parametrize("histograms", [False, True], ids=["scalar_steps", "histogram_steps"])
def test_one_host_read_per_monitor_per_logged_step(tmp_path, histograms):
    """A fit with the four monitors reads the host 4 times per logged step more than the same fit without them."""
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
        # figures off the path: they are drawn from the CPU summaries, but keep the count about the step
        for m in monitors:
            m._log_figure = lambda *args, **kwargs: None
        t = trainer(tmp_path / str(with_monitors), monitors, max_steps=6, log_every_n_steps=every)
        with HostReads() as reads:
            t.fit(TanhMLP(), fixed_loader(saturating_batch(), 6))
        counts[with_monitors] = reads.count
    logged_steps = 3  # steps 1, 3, 5 (5 is also the final step)
    assert counts[True] - counts[False] == 4 * logged_steps


def _mixed(seed: int) -> torch.Tensor:
    """(8, 5, 6): a large mean next to a small spread, where the sum of squares needs float64 accumulation."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 1e-3 * torch.randn(8, 5, 6, generator=g)


@pytest.mark.parametrize("kind", ["normal", "one", "int", "bf16", "mixed"])
def test_fast_stats_equal_the_nan_aware_ones_on_finite_tensors(kind):
    x = _mixed(4) if kind == "mixed" else _tensor(kind)
    for saturation, relu_like in ((None, False), ((0.0, 0.5), True)):
        fast_s, fast_m = fast_stats(x, saturation, relu_like)
        slow_s, slow_m = local_stats(x, saturation, relu_like)
        assert fast_s[[COUNT, NONFINITE, SATURATED, DEAD, UNITS]].tolist() == (
            slow_s[[COUNT, NONFINITE, SATURATED, DEAD, UNITS]].tolist()
        )
        # float64 throughout (the NaN-aware path squares in float32 first: equal to ~1e-7)
        a = x.double().numpy().ravel()
        assert fast_s[[SUM, SUMSQ]].tolist() == pytest.approx([a.sum(), (a**2).sum()], rel=1e-12, abs=1e-12)
        assert fast_s[[SUM, SUMSQ]].tolist() == pytest.approx(slow_s[[SUM, SUMSQ]].tolist(), rel=1e-6)
        assert fast_m.tolist() == slow_m.tolist()


def test_fast_stats_make_nan_and_inf_visible_in_the_sums():
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(10, 4)
        x[3, 1] = bad
        sums, _ = fast_stats(x)
        assert not math.isfinite(sums[SUMSQ].item())


@pytest.mark.parametrize("bins", [1, 4, 64])
def test_bin_counts_of_a_finite_tensor_against_numpy_histogram(bins):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5)).clamp(-1.5, 2.0)
    lo, hi = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    expected, _ = np.histogram(x.numpy(), bins=bins, range=(-1.5, 2.0))
    assert bin_counts(x, lo, hi, bins, finite=True).tolist() == expected.tolist()
    assert bin_counts(x, lo, hi, bins).tolist() == expected.tolist()


def test_bin_counts_said_finite_never_fails_on_nan_or_inf():
    """The fast pass bins a tensor with NaN/inf as if finite before it knows; the counts are wrong but in range."""
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.5])
    counts = bin_counts(x, torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), 4, True)
    assert counts.shape == (4,) and counts.sum().item() == 4
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    assert bin_counts(torch.ones(3), nan, nan, 4, finite=True).sum().item() == 3


def test_the_scatter_counts_of_cuda_equal_bincount():
    """The CUDA path (scatter_add_, no host read), run on the CPU against bincount of the finite entries."""
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(0, 8, (500,), generator=g)
    finite = torch.rand(500, generator=g) > 0.1
    assert _scatter_counts(idx.clone(), finite, 8).tolist() == torch.bincount(idx[finite], minlength=8).tolist()
    assert _scatter_counts(idx.clone(), None, 8).tolist() == torch.bincount(idx, minlength=8).tolist()


@pytest.mark.parametrize("histograms", [False, True])
def test_a_step_with_nan_and_inf_gets_the_nan_aware_statistics(histograms):
    """NaN/inf in one of two micro-batches: the name is recomputed NaN-aware (against numpy); a finite name
    beside it keeps its fast statistics; the host is read twice on such a step."""
    g = torch.Generator().manual_seed(7)
    a, b, c = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g) * 2, torch.randn(3, 5, generator=g)
    b[0, 0], b[1, 1], b[2, 2] = float("nan"), float("inf"), float("-inf")
    buffer = StatsBuffer()
    buffer.add("x", a, keep=histograms, saturation=(0.0, 1.0), relu_like=True)
    buffer.add("x", b, keep=histograms, saturation=(0.0, 1.0), relu_like=True)
    buffer.add("ok", c, keep=histograms)
    with HostReads() as reads:
        s = buffer.reduce(["x", "ok"], torch.device("cpu"), None, histograms=histograms, bins=8)
    assert reads.count == 2
    both = torch.cat([a, b]).double().numpy().ravel()
    finite = both[np.isfinite(both)]
    x = s["x"]
    assert (x.count, x.nonfinite, x.nonfinite_rank) == (finite.size, 3, 0)
    assert x.mean == pytest.approx(finite.mean()) and x.std == pytest.approx(finite.std(ddof=1))
    assert x.saturation == pytest.approx((np.abs(finite) > 1.0).sum() / finite.size)
    assert x.dead == pytest.approx(sum(local_stats(t, relu_like=True)[0][DEAD].item() for t in (a, b)) / 10)
    assert s["ok"].mean == pytest.approx(c.double().mean().item()) and s["ok"].nonfinite == 0
    if histograms:
        assert (x.min, x.max) == (finite.min(), finite.max())
        expected, edges = np.histogram(finite, bins=8, range=(finite.min(), finite.max()))
        assert x.counts == expected.tolist() and x.edges == pytest.approx(edges.tolist())
        ok = c.double().numpy().ravel()
        assert s["ok"].counts == np.histogram(ok, bins=8, range=(ok.min(), ok.max()))[0].tolist()


def test_recompute_is_called_only_on_a_step_with_nan():
    made = []

    def remake(t: torch.Tensor) -> Any:
        def make() -> torch.Tensor:
            made.append(1)
            return t

        return make

    fine, bad = torch.randn(5, 3), torch.randn(5, 3)
    bad[0, 0] = float("nan")
    buffer = StatsBuffer()
    buffer.add("u", fine, keep=False, recompute=remake(fine))
    assert buffer.reduce(["u"], torch.device("cpu"), None, False, 4)["u"].count == 15 and not made
    buffer.add("u", bad, keep=False, recompute=remake(bad))
    u = buffer.reduce(["u"], torch.device("cpu"), None, False, 4)["u"]
    finite = bad.double().numpy().ravel()[1:]
    assert made == [1] and (u.count, u.nonfinite) == (14, 1) and u.mean == pytest.approx(finite.mean())


def test_a_failed_recompute_on_one_rank_is_raised_on_every_rank():
    """The NaN-aware second pass joins the collectives even when making a tensor again fails on one rank."""

    def work(rank: int, reducer: Any) -> Any:
        x = torch.ones(4)
        x[0] = float("nan")

        def fail() -> torch.Tensor:
            raise ValueError("cannot remake")

        buffer = StatsBuffer()
        buffer.add("u", x, keep=False, recompute=fail if rank == 0 else None)
        return buffer.reduce(["u"], torch.device("cpu"), reducer, False, 4, who="Probe", rank=rank)

    r0, r1 = _two_ranks(work)
    assert isinstance(r0, ValueError) and str(r0) == "cannot remake"
    assert isinstance(r1, MonitorRankError) and "Probe" in str(r1)
