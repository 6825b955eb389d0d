"""benchmarks/fault_zoo.py --quick: the CI slice of the fault zoo (a base over two seeds and four mutants)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from benchmarks.fault_zoo import main


def test_quick_zoo_scores_what_its_runs_show(tmp_path):
    main(["--quick", "--out", str(tmp_path / "zoo")])
    data = json.loads((tmp_path / "zoo.json").read_text())
    s, runs = data["summary"], data["runs"]
    bases = [r for r in runs if not r["operator"]]
    mutants = {r["operator"]: r for r in runs if r["operator"]}
    assert len(bases) == 2 and set(mutants) == {"lr /100", "zeros", "no gain", "softmax"}
    # a mutant is sick when its val is worse than its base's mean by more than the noise: recomputed here
    noise = s["noise"]["blobs-mlp"]
    mean = sum(r["val"] for r in bases) / 2
    assert noise["mean"] == pytest.approx(mean)
    for r in mutants.values():
        assert r["sick"] == (r["val"] > mean + noise["threshold"])
    # the learning rate / 100 on SGD: sick, flagged as too low, and healed by the report's own lr x100
    slow = mutants["lr /100"]
    assert slow["sick"] and any(p["key"].startswith("lr/") for p in slow["problems"])
    first = slow["heal_rounds"][0]
    assert "lr × 100" in first["changed"] and first["kept"] and slow["healed"]
    assert slow["heal_rounds"][-1]["final"] <= mean + noise["threshold"]
    # the scores, recounted from the runs
    sick = [r for r in mutants.values() if r["sick"]]
    flagged = [r for r in sick if r["flagged"]]
    assert s["sick"] == len(sick) and s["recall"] == pytest.approx(100 * len(flagged) / len(sick), abs=0.1)
    assert s["fixes_on_healthy_bases"] == sum(bool(r["actions"]) for r in bases)
    assert s["harmful_kept"] == 0
    report = (tmp_path / "zoo.md").read_text()
    assert "AutoTrainer" in report and "| blobs-mlp seed 0 | lr /100 |" in report
