"""Smoke test of `benchmarks/bench_monitors.py` on its tiny model: the script runs and reports every row.

No timing or memory figure is asserted (they belong in the benchmark's own output); what is checked is what the
script reads back from the logs it wrote: the histograms per logged step and their size on disk, and which step
of a `--memory` case recorded.
"""

import argparse
import cProfile
import importlib.util
import os
import pstats
import re
import tempfile
from pathlib import Path

import pytest
import torch

from tests.callbacks_helpers import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_monitors") as module:
        yield module


def test_quick_run_reports_rows_and_log_sizes(
    bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the script's temp folder goes
    threads = torch.get_num_threads()
    bench.main(["--quick", "--repeats", "1", "--rows", "dense", "tb_hist"])
    assert torch.get_num_threads() == threads
    assert not list(tmp_path.glob("bench_monitors_*")), "temp folder left behind"
    out = capsys.readouterr().out
    rows = {m[0].strip(): m[1:] for m in re.findall(r"^\| ([^|]+) \|" + r"([^|]*)\|" * 8, out, re.M)}
    assert {"none", "ours, dense (scalars + histograms /10)", "hand-written add_histogram /10"} <= rows.keys()
    dense, tb = rows["ours, dense (scalars + histograms /10)"], rows["hand-written add_histogram /10"]
    # the tiny GPT: 2 blocks; ours: 2 GELU outputs, their 2 gradients, 2 x 4 weight matrices + wte + wpe
    # (>= 2-D) and their gradients; add_histogram: all 2 x 12 + 4 parameters and their gradients
    assert int(dense[6]) == 2 + 2 + 2 * (2 * 4 + 2)
    assert int(tb[6]) == 2 * (2 * 12 + 4)
    assert 0 < int(dense[7]) < int(tb[7])  # bytes per histogram: 64 bins against TensorBoard's own bins


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_memory_cases_record_the_measured_step_or_not(bench) -> None:
    """`--memory`'s cases, run here in-process on the tiny GPT: the measured step records every histogram of the
    four monitors in the recorded case and none in the unrecorded one; the sizes it reports are the tensors'."""
    args = argparse.Namespace(threads=1, batch=16, device="cpu", precision="32-true", quick=True)
    threads = torch.get_num_threads()
    recorded, unrecorded = bench.memory_child("recorded", args), bench.memory_child("unrecorded", args)
    assert torch.get_num_threads() == threads
    assert recorded["histograms_at_measured"] == 2 + 2 + 2 * (2 * 4 + 2)  # as in the quick run above
    assert unrecorded["histograms_at_measured"] == 0 and bench.MEASURED not in unrecorded["histogram_steps"]
    for x in (recorded, unrecorded):
        assert 0 < x["start"] <= x["peak"]
        # the tiny GPT at batch 4: a GELU output is (4, 16, 4 * 32) float32; the >= 2-D parameters are wte (65, 32),
        # wpe (16, 32) and per block c_attn (32, 96), c_proj (32, 32), c_fc (32, 128), c_proj (128, 32)
        assert x["largest_watched"] == 4 * 16 * 128 * 4
        assert x["watched_weights"] == 4 * (65 * 32 + 16 * 32 + 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32))


def test_the_model_work_a_pass_through_runs_for_the_model_is_not_counted_as_ours(bench, tmp_path) -> None:
    # a profile on a clock that moves only where the code says, so every function's time is known exactly
    clock = [0]
    package = tmp_path / "callbacks"
    package.mkdir()
    (package / "_attention.py").write_text(
        "def scaled_dot_product_attention(clock, original):  # a tap's wrapper: 2 of its own, then the original\n"
        "    clock[0] += 2\n"
        "    return original(clock)\n"
        "def hook(clock, original):  # our own work, which calls the wrapper too\n"
        "    clock[0] += 1\n"
        "    return scaled_dot_product_attention(clock, original)\n"
    )
    spec = importlib.util.spec_from_file_location("fake_attention", package / "_attention.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)

    def attention(clock: list) -> None:  # the model's own work: outside the package
        clock[0] += 10

    def step() -> None:  # a training step, outside the package
        fake.scaled_dot_product_attention(clock, attention)  # the model calls the wrapper: 2 ours + 10 the model's
        fake.hook(clock, attention)  # a hook of ours: 1 + 2 + 10, all ours

    profiler = cProfile.Profile(lambda: float(clock[0]))
    profiler.runcall(step)
    stats = pstats.Stats(profiler)
    prefix = str(package) + os.sep
    assert bench.seconds_in_callbacks(stats, prefix, pass_through=frozenset()) == 25  # everything entered from outside
    assert bench.seconds_in_callbacks(stats, prefix) == 2 + 13  # less the model's 10 behind the model's own call


def test_health_parts_are_checked_and_put_back_after_the_run(bench) -> None:
    import callbacks.health
    from callbacks import HealthMonitor

    every = callbacks.health.PARTS
    with pytest.raises(SystemExit, match="2"):  # argparse's error: one line naming the parts
        bench.main(["--quick", "--health-parts", "transformers"])
    args = argparse.Namespace(health_parts=["diagnoses"], device="cpu", threads=1)
    with bench._benchmark_scope(args):
        recorded = HealthMonitor().recorder.parts
    assert len(recorded) == 4 + 1  # the four monitors' parts and the diagnoses: no Transformer or loss-input part
    assert callbacks.health.PARTS is every
    assert len(HealthMonitor().recorder.parts) == 4 + len(every)
