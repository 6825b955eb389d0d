"""benchmarks/transformer_sweep.py: the quick sweep's runs behave as the judges say, the scoring rule worked by hand,
and the committed results page is what the stored runs score to."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.transformer_sweep import QUICK_STEPS, Run, case, load, main, report, score

ROOT = Path(__file__).resolve().parent.parent


def test_quick_sweep_flags_the_high_lr_and_qk_layernorm_keeps_it_quiet(tmp_path):
    main(["--quick", "--out", str(tmp_path)])
    runs = {r.name: r for r in load(tmp_path / "transformer_sweep.json")}
    assert set(runs) == {f"lr={lr} {v} seed=0" for lr in ("0.01", "0.1") for v in ("plain", "qk-ln")}
    for r in runs.values():
        assert len(r.losses) == QUICK_STEPS
        assert r.final == pytest.approx(sum(r.losses[-20:]) / 20, abs=1e-4)
    good, high, healed = runs["lr=0.01 plain seed=0"], runs["lr=0.1 plain seed=0"], runs["lr=0.1 qk-ln seed=0"]
    # the readouts themselves (not the judge): at lr 0.1 the plain model's attention logits pass the judge's 50,
    # its loss stays near a uniform guess (ln 32 = 3.47) and ends well above the loss at lr 0.01
    assert max(v for _, v in high.logit_max) > 50
    assert high.final > math.log(32) - 0.2 and high.final > good.final + 0.3
    # ... and the judge says so, with the layer, early in the run
    logits = [f for f in high.findings if f["key"].startswith("attention_logits/")]
    assert logits and logits[0]["where"].startswith("model.h.") and "qk-layernorm" in logits[0]["text"]
    assert high.fired("attention_logits") < QUICK_STEPS // 4
    # qk-layernorm at the same learning rate: logits held down, no Transformer finding, a lower loss
    assert max(v for _, v in healed.logit_max) < 50
    assert healed.findings == [] and healed.final < high.final - 0.2
    # the healthy lr: quiet, with or without qk-layernorm
    assert good.findings == [] and runs["lr=0.01 qk-ln seed=0"].findings == []
    verdicts = {s.run.name: (s.verdict, s.ok) for s in score(list(runs.values()))}
    assert verdicts["lr=0.1 plain seed=0"] == ("degrades", True)
    assert verdicts["lr=0.01 plain seed=0"] == ("trains well", True)
    page = (tmp_path / "transformer_sweep.md").read_text()
    assert "| lr=0.1 plain seed=0 |" in page and "--quick" in page
    assert (tmp_path / "transformer_lr_sensitivity.png").stat().st_size > 0
    assert (tmp_path / "transformer_attention_logits.png").stat().st_size > 0


def _run(lr: float, seed: int, losses: list[float], fired: dict[str, int] | None = None, eps: float = 1e-8) -> Run:
    findings = [
        {"key": f"{k}/model.h.0.attn", "step": s, "where": "model.h.0.attn", "text": ""}
        for k, s in (fired or {}).items()
    ]
    return Run(
        lr, False, 0.0, seed, eps=eps, steps=len(losses), final=sum(losses[-20:]) / 20, losses=losses, findings=findings
    )


def test_score_against_the_best_lr_of_the_same_variant_by_hand():
    flat = lambda x: [x] * 100  # noqa: E731
    runs = [
        _run(1e-2, 0, flat(2.0)),
        _run(1e-2, 1, flat(2.2), {"attention_entropy": 49}),  # within the noise of the best: a false alarm
        _run(1e-1, 0, flat(2.1)[:50] + flat(2.5)[:50], {"attention_logits": 29}),  # worse from step 50
        _run(1e-1, 1, flat(2.5)),  # degrades, never flagged
        _run(1e-3, 0, flat(2.9)),  # worse, but below the best lr: slow
        _run(1e-3, 1, flat(2.9)),
        _run(1e-2, 0, flat(3.0), {"adam_eps": 19}, eps=0.1),  # the ε run, against the lr 1e-2 runs at ε 1e-8
    ]
    # seed variances: lr 1e-2 (2.0, 2.2) 0.02, lr 1e-1 (2.5, 2.5) 0, lr 1e-3 0: pooled sd sqrt(0.02 / 3)
    margin = 2 * math.sqrt(0.02 / 3)
    s = score(runs)
    assert [x.best_lr for x in s[:6]] == [1e-2] * 6 and s[0].best_final == pytest.approx(2.1)
    assert s[0].margin == pytest.approx(margin)
    assert [x.verdict for x in s] == ["trains well"] * 2 + ["degrades"] * 2 + ["too low lr"] * 2 + ["degrades"]
    assert [x.ok for x in s] == [True, False, True, False, True, True, True]
    assert [x.expected for x in s[2:4]] == ["attention_logits"] * 2 and s[6].expected == "adam_eps"
    # the mean curve at lr 1e-2 is 2.1: the first run at lr 1e-1 leaves it by more than the margin at step 50
    assert s[2].degraded_at == 50 and s[2].lead == 50 - 29
    assert s[3].degraded_at == 0 and s[3].lead is None
    # what the fault zoo gets
    case_ = case(s[3])
    assert case_["expected"] == {"attention_logits"} and case_["fired"] == set() and case_["ok"] is False
    assert case_["verdict"] == "degrades" and case_["degraded_at"] == 0 and case_["final_loss"] == pytest.approx(2.5)
    page = report(runs, 60.0)
    assert "**1 of 2**" in page  # plain runs that degrade, flagged
    assert "**1 of 4**" in page  # false alarms on the runs that do not degrade


def test_the_committed_results_are_what_the_stored_runs_score_to(tmp_path):
    main(["--rescore", str(ROOT / "benchmarks" / "results" / "transformer_sweep.json"), "--out", str(tmp_path)])
    committed = (ROOT / "benchmarks" / "results" / "transformer_sweep.md").read_text()
    assert (tmp_path / "transformer_sweep.md").read_text() == committed


def test_rescore_of_a_missing_file_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--rescore", str(tmp_path / "nope.json")])
    assert "no such file" in capsys.readouterr().err
