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
    bin_counts,
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
