"""`benchmarks/bench_speed.py`'s step-by-place summary (`--by-place`) and its ratios' intervals against hand-computed
numbers.

No timing is asserted: what is checked is the arithmetic that turns each fit's step ends into a cycle's time, that
the benchmark's clock keeps every timed step's end while asked to, and the interval of the median of each ratio's
repeats (the order statistics the binomial allows) with the row that prints it.
"""

import itertools

import pytest

from tests.callbacks_helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_speed") as module:
        yield module


def _ends(intervals: list[float]) -> list[float]:
    return list(itertools.accumulate(intervals, initial=0.0))


def test_steps_by_place_sum_each_place_median_and_mean_over_the_cycle(bench):
    # warm-up 2, a cycle of 4: interval j is global step 2 + j, so its place is (2 + j) % 4
    marks = {
        # one fit: places 2, 3, 0, 1, 2, 3, 0, 1 take 1, 2, 3, 4, ... seconds: a cycle of 10 s either way
        "ours": [_ends([1, 2, 3, 4, 1, 2, 3, 4])],
        # two fits of 2 s steps, one of them with a 50 s step at place 1: medians 4 x 2 = 8 s, means 2 + 2 + 2 + 14
        "ours+group": [_ends([2] * 8), _ends([2] * 7 + [50])],
    }
    rows = bench.by_place(marks, warmup=2, cycle=4)
    assert "| (c) ours | 2500.000 | 2500.000 | 1.000 | 1.000 |" in rows
    assert "| (g) ours+group | 2000.000 | 5000.000 | 0.800 | 2.000 |" in rows


def test_the_clock_keeps_every_timed_step_end_while_asked(bench):
    clock = bench.Clock(warmup=3, last=6)
    bench.Clock.marks = []
    try:
        for step in range(1, 7):
            clock.tick(step)
        kept = bench.Clock.marks
    finally:
        bench.Clock.marks = None
    assert len(kept) == 4 and kept == sorted(kept)  # the ends of steps 3 (the window's start) to 6
    wall, _, steps = clock.result()
    assert steps == 3 and wall == pytest.approx(kept[-1] - kept[0], abs=1e-3)
    clock.tick(6)  # not asked any more: nothing kept
    assert bench.Clock.marks is None


def test_a_cycle_below_one_step_is_refused_in_one_line(bench, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_speed.py", "--by-place", "-3"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: --by-place takes a cycle of at least 1 step (500: the monitors' cadence), not -3")


def test_the_interval_of_the_median_is_the_order_statistics_the_binomial_allows(bench):
    # five repeats: P(B(5, 1/2) = 0) = 1/32 <= 5 %, P(B <= 1) = 6/32 > 5 %: the range (k = 1)
    assert bench.median_interval([1.04, 0.99, 1.07, 1.01, 1.03]) == (0.99, 1.07)
    # twenty: P(B(20, 1/2) <= 5) = 0.0207 <= 5 % < P(B <= 6) = 0.0577: the 6th to the 15th smallest
    values = [float(v) for v in range(20, 0, -1)]
    assert bench.median_interval(values) == (6.0, 15.0)
    # three repeats cannot reach 90 %: their range
    assert bench.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    with pytest.raises(ValueError):
        bench.median_interval([])


def test_the_ratios_give_each_repeat_paired_with_its_interval(bench):
    # seconds per fit; steps/s ratio g / c of repeat i is c_i / g_i: 1/1.04, 1/1.02, 1/1.10, 1/1.01, 1/1.05
    c = [10.0, 10.0, 10.0, 10.0, 10.0]
    times = {
        "ours": {"wall": c, "cpu": c},
        "ours+group": {"wall": [10.4, 10.2, 11.0, 10.1, 10.5], "cpu": [10.4, 10.2, 11.0, 10.1, 10.5]},
    }
    (row,) = [r for r in bench.ratios(times) if r.startswith("| g / c |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    # of the medians: 10 / 10.4; each repeat's median 1 / 1.04 = 0.962, range 1/1.10 = 0.91 to 1/1.01 = 0.99
    assert cells[1:5] == ["0.962", "0.96", "0.962 (0.91-0.99)", "0.909-0.990"]
    assert cells[5].startswith(">= 0.952 (time <= 1.05 x)")
