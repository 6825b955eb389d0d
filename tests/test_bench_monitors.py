"""Smoke test of `benchmarks/bench_monitors.py` on its tiny model: the script runs and reports every row.

No timing is asserted (speed belongs in the benchmark's own output); what is checked is what the
script reads back from the logs it wrote: the histograms per logged step and their size on disk.
"""

import importlib.util
import re
import tempfile
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_monitors.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_monitors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
