"""benchmarks/fault_zoo.py --quick: the CI slice of the fault zoo (a base over two seeds and four mutants)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

from benchmarks.fault_zoo import main
from tests.conftest import ROOT


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
    # a softmax before the cross-entropy: found by the loss-input check, at step 0
    softmax = mutants["softmax"]
    assert ("loss_input/cross_entropy", "cross_entropy") in [(p["key"], p["where"]) for p in softmax["problems"]]
    # the Transformer sweep's committed runs, folded in: its sick and flagged cases, recounted from the cases
    cases = data["transformer_sweep"]
    assert len(cases) == s["sweep_runs"] == 50
    sick_cases = [c for c in cases if c["verdict"] != "trains well"]
    caught = sum(bool(c["findings"]) for c in sick_cases)
    false = sum(bool(c["findings"]) for c in cases if c["verdict"] == "trains well")
    assert (s["sweep_sick"], s["sweep_flagged_sick"], s["sweep_flagged_healthy"]) == (len(sick_cases), caught, false)
    flagged_healthy = sum(r["flagged"] for r in bases)
    both = 100 * (len(flagged) + caught) / (len(flagged) + caught + flagged_healthy + false)
    assert s["precision_all"] == pytest.approx(both, abs=0.1)
    assert s["recall_all"] == pytest.approx(100 * (len(flagged) + caught) / (len(sick) + len(sick_cases)), abs=0.1)
    assert "## The Transformer sweep's runs, folded in" in report


def test_a_missing_sweep_file_is_one_line_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--quick", "--transformer", str(tmp_path / "nope.json"), "--out", str(tmp_path / "zoo")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        f"--transformer {tmp_path / 'nope.json'}: no such file; give a transformer_sweep.json, 'run' or 'none'"
    )
    assert not (tmp_path / "zoo.json").exists()  # nothing written


def test_the_committed_results_are_what_the_stored_runs_score_to(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "fault_zoo"
    main(["--rescore", str(committed.with_suffix(".json")), "--out", str(tmp_path / "zoo")])
    assert (tmp_path / "zoo.md").read_text() == committed.with_suffix(".md").read_text()


def test_rescore_of_a_missing_file_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--rescore", str(tmp_path / "nope.json"), "--out", str(tmp_path / "zoo")])
    assert "no such file; give a fault_zoo.json the zoo wrote" in capsys.readouterr().err
