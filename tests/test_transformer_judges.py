"""The Transformer judges on hand-made readouts: each fires once, after its patience, with the layer and the fix, and
stays silent on healthy numbers."""

import math

from callbacks.judges.base import Readouts
from callbacks.judges.transformer import (
    AttentionEntropyCollapse,
    AttentionLogitGrowth,
    EpsDominatedUpdates,
    OutputLogitDivergence,
)
from callbacks.probes.adam import AdamEps, EpsParam
from callbacks.probes.attention import Attention, AttentionLayer
from callbacks.probes.logits import OutputLogits


def attention(step: int, logit_max: float, share: float) -> Readouts:
    layers = [
        AttentionLayer("h.0.attn", "h.0.attn (CausalSelfAttention)", 3.0, 2.0, 2.0, 0.8, [3.0, 2.0], [0.8, 0.8]),
        AttentionLayer(
            "h.1.attn", "h.1.attn (CausalSelfAttention)", logit_max, logit_max / 2, 0.1, share, [1.0, logit_max], []
        ),
    ]
    return Readouts.of(Attention(step, 0.99, layers))


def test_attention_logit_growth():
    judge = AttentionLogitGrowth(limit=50, patience=2)
    assert judge.observe(10, attention(10, 40.0, 0.5)) == []  # below the limit
    assert judge.observe(20, attention(20, 60.0, 0.5)) == []  # once: not yet
    (f,) = judge.observe(30, attention(30, 200.0, 0.02))
    assert (f.step, f.where, f.key) == (30, "h.1.attn (CausalSelfAttention)", "attention_logits/h.1.attn")
    assert "max |q·k|/√d is 200" in f.message and "(head 1)" in f.message
    assert "qk-layernorm" in f.fix
    assert judge.observe(40, attention(40, 300.0, 0.02)) == []  # reported once (the streak is past its patience)


def test_attention_entropy_collapse():
    judge = AttentionEntropyCollapse(share=0.1, patience=2)
    assert judge.observe(10, attention(10, 5.0, 0.05)) == []
    (f,) = judge.observe(20, attention(20, 5.0, 0.04))
    assert f.where == "h.1.attn (CausalSelfAttention)" and "4.0% of a uniform row's" in f.message
    judge = AttentionEntropyCollapse()
    assert all(judge.observe(s, attention(s, 5.0, math.nan)) == [] for s in (10, 20, 30))  # no rows: no verdict


def test_healthy_numbers_stay_silent():
    judges = [AttentionLogitGrowth(), AttentionEntropyCollapse(), OutputLogitDivergence(), EpsDominatedUpdates()]
    healthy = Readouts.of(
        attention(0, 30.0, 0.5)[Attention],
        OutputLogits(0, "head (Linear)", 100, 5.0, 3.0, 8.0, -10.0, 12.0, 15.0),
        AdamEps(0, [EpsParam("w", 1e-8, 0.01, 1e-4, 1e-3, 0.3, 100)]),
    )
    for step in range(0, 100, 10):
        for judge in judges:
            if all(r in healthy for r in judge.reads):
                assert judge.observe(step, healthy) == []


def test_output_logit_divergence():
    judge = OutputLogitDivergence(limit=20, patience=3)
    drifted = [OutputLogits(s, "head (Linear)", 10, -40.0, -60.0, -30.0, -90.0, 5.0, 80.0) for s in range(3)]
    out = [judge.observe(r.step, Readouts.of(r)) for r in drifted]
    assert out[0] == [] and out[1] == []
    (f,) = out[2]
    assert f.step == 2 and f.where == "head (Linear)" and "-40" in f.message and "z-loss" in f.fix


def test_eps_dominated_updates():
    judge = EpsDominatedUpdates(share=0.5, patience=3)
    sick = EpsParam("h.0.fc.weight", 0.1, 0.97, 0.9, 2e-3, 0.02, 1000)
    fine = EpsParam("h.0.out.weight", 1e-8, 0.0, 1e-5, 2e-3, 0.4, 1000)
    embedding = EpsParam("wte.weight", 1e-8, 0.7, 0.6, 1e-3, 0.2, 1000)  # unused rows, but its RMS is far above ε
    k_bias = EpsParam("h.0.k_norm.bias", 0.1, 1.0, 1.0, 1e-10, 1e-3, 16)  # a zero gradient but for rounding
    found = [judge.observe(s, Readouts.of(AdamEps(s, [sick, fine, embedding, k_bias]))) for s in (10, 20, 30)]
    assert found[:2] == [[], []]
    (f,) = found[2]
    assert f.where == "h.0.fc.weight" and "ε = 1e-01" in f.message and "97%" in f.message
    assert "smaller ε" in f.fix
