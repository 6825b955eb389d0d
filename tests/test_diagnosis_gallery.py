"""Smoke test of `benchmarks/diagnosis_gallery.py --quick` on two of its runs (an MLP and a GPT, a small corpus).

No judge's calibration is asserted here (that is the gallery's own output, and `tests/test_judges.py`); what is
checked is that the script trains, judges and writes what it says: the table, precision and recall, and the JSON
with every finding, and that the check at initialisation names the output layer of the over-confident MLP.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from tests.callbacks_helpers import benchmark_module


@pytest.fixture(scope="module")
def gallery():
    with benchmark_module("diagnosis_gallery") as module:
        yield module


def test_quick_gallery_writes_the_table_and_scores(
    gallery, small_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAKEMORE_NAMES", str(small_corpus))
    threads = torch.get_num_threads()
    out = tmp_path / "gallery"
    payload = gallery.main(["--quick", "--runs", "tanh fix, output layer randn", "corrupted", "--out", str(out)])
    assert torch.get_num_threads() == threads
    runs = payload["runs"]
    assert list(runs) == ["over-confident output (tanh fix, output layer randn)", "GPT, one corrupted batch (step 600)"]
    assert [r["steps"] for r in runs.values()] == [300, 200]  # --quick

    # the over-confident MLP: the init check names its output layer
    mlp = runs["over-confident output (tanh fix, output layer randn)"]
    init = [f for f in mlp["findings"] if f["key"] == "init/loss"]
    assert len(init) == 1 and init[0]["where"] == "net.head" and init[0]["step"] == 0
    assert mlp["assessment"]["expected"] == [{"what": "init loss far above ln 27", "found": True, "layer_right": True}]

    # precision and recall as the docstring defines them, from the per-run assessments
    scores = payload["scores"]
    problems = sum(r["assessment"]["problems"] for r in runs.values())
    correct = sum(r["assessment"]["correct"] for r in runs.values())
    expected = [e for r in runs.values() for e in r["assessment"]["expected"]]
    assert scores["problem findings"] == problems and scores["correct"] == correct
    assert scores["precision"] == pytest.approx(correct / problems)
    assert scores["recall"] == pytest.approx(sum(e["layer_right"] for e in expected) / len(expected))

    md = out.with_suffix(".md").read_text()
    assert json.loads(out.with_suffix(".json").read_text())["scores"] == scores
    assert f"**Precision {scores['precision']:.0%}**" in md and f"**recall {scores['recall']:.0%}**" in md
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \| (.+?) \|$", md, re.M)
    assert ("run", "expected", "found: problems (notes)", "layer right?") in rows
    assert any(r[0] == "over-confident output (tanh fix, output layer randn)" and r[3].startswith("yes") for r in rows)
    assert "## Margins" in md and "--quick" in md
    assert md in capsys.readouterr().out  # printed as written
