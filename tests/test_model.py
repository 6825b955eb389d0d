"""The plain MLP: shapes, parameter counts, and the lecture's init statistics at step 0."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_makemore.model import MLP, kaiming_gain

LN27 = math.log(27)  # 3.2958: the loss of a uniform prediction over 27 tokens
NEAR_LN27 = (LN27 - 0.05, LN27 + 0.05)


@pytest.fixture(scope="module")
def init_batch(names_dm):
    X, Y = names_dm.splits["train"]
    ix = torch.randint(0, len(X), (4096,), generator=torch.Generator().manual_seed(2147483647))
    return X[ix], Y[ix]


def _stats(net: MLP, batch) -> tuple[float, float]:
    """Loss and share of tanh outputs with |h| > 0.97 of a freshly built net, in training mode."""
    x, y = batch
    with torch.no_grad():
        loss = F.cross_entropy(net(x), y).item()
        h = net.activations(x)[0]
    return loss, (h.abs() > 0.97).float().mean().item()


REGIMES = {
    # name: (kwargs, loss range, saturation range) -- from ../shared/LECTURE.md
    "naive": (dict(init="naive", last_layer_scale=None, batchnorm=False), (10.0, 60.0), (0.60, 0.75)),
    "softmax_fix": (dict(init="naive", last_layer_scale=0.01, batchnorm=False), NEAR_LN27, (0.60, 0.75)),
    "tanh_fix": (dict(init="tanh_fix", last_layer_scale=0.01, batchnorm=False), NEAR_LN27, (0.0, 0.10)),
    "kaiming": (dict(init="kaiming", last_layer_scale=0.01, batchnorm=False), NEAR_LN27, (0.15, 0.25)),
    "batchnorm": (dict(init="kaiming", last_layer_scale=0.01, batchnorm=True), NEAR_LN27, (0.0, 0.10)),
    # the deep net's way: Kaiming output layer (gain 1) and a BatchNorm on the logits with gamma 0.1
    "deep": (
        dict(init="kaiming", last_layer_scale=None, n_layers=5, n_hidden=100, logits_batchnorm=True),
        NEAR_LN27,
        (0.0, 0.10),
    ),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_init_loss_and_saturation_match_the_lecture(regime, init_batch):
    kwargs, (lo, hi), (slo, shi) = REGIMES[regime]
    net = MLP(27, 3, 10, **({"n_hidden": 200} | kwargs), generator=torch.Generator().manual_seed(2147483647))
    loss, sat = _stats(net, init_batch)
    assert lo <= loss <= hi, f"{regime}: loss at init {loss:.3f} not in [{lo:.3f}, {hi:.3f}]"
    assert slo <= sat <= shi, f"{regime}: saturation {sat:.3f} not in [{slo}, {shi}]"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(batchnorm=False), 270 + 30 * 200 + 200 + 200 * 27 + 27),  # 11,897
        (dict(batchnorm=True), 270 + 30 * 200 + 2 * 200 + 200 * 27 + 27),  # 12,097: no b1, gamma and beta
        # the lecture's deep net: 47,024 parameters
        (dict(n_layers=5, n_hidden=100, logits_batchnorm=True, last_layer_scale=None, bn_momentum=0.1), 47_024),
    ],
)
def test_parameter_counts(kwargs, expected):
    params = dict(vocab_size=27, block_size=3, n_embd=10, n_hidden=200) | kwargs
    net = MLP(**params)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_deep_net_init_is_the_lectures():
    g = torch.Generator().manual_seed(0)
    net = MLP(27, 3, 10, 100, n_layers=5, logits_batchnorm=True, last_layer_scale=None, bn_momentum=0.1, generator=g)
    assert torch.allclose(net.head_bn.weight, torch.full((27,), 0.1))
    w = net.blocks[1].linear.weight
    assert w.std().item() == pytest.approx((5 / 3) / math.sqrt(100), rel=0.05)  # Kaiming with tanh's gain
    assert net.head.weight.std().item() == pytest.approx(1 / math.sqrt(100), rel=0.05)  # gain 1 before logits


def test_shapes_and_forward():
    net = MLP(30, block_size=8, n_embd=4, n_hidden=16, n_layers=3)
    out = net(torch.randint(0, 30, (5, 8)))
    assert out.shape == (5, 30)
    assert len(net.activations(torch.randint(0, 30, (5, 8)))) == 3


@pytest.mark.parametrize(
    ("name", "gain"), [("tanh", 5 / 3), ("relu", math.sqrt(2)), ("sigmoid", 1.0), ("gelu", math.sqrt(2))]
)
def test_kaiming_gain(name, gain):
    assert kaiming_gain(name) == pytest.approx(gain)


def test_kaiming_keeps_relu_activations_from_vanishing():
    # 8 layers of ReLU without BatchNorm: with Kaiming's sqrt(2) the activations keep their scale
    torch.manual_seed(0)
    net = MLP(27, 3, 10, 256, n_layers=8, batchnorm=False, activation="relu", init="kaiming")
    with torch.no_grad():
        acts = net.activations(torch.randint(0, 27, (2048, 3)))
    rms = [a.pow(2).mean().sqrt().item() for a in acts]
    assert max(rms) / min(rms) < 2.0, rms


def test_dropout_is_a_layer_in_each_block():
    net = MLP(27, 3, 10, 20, n_layers=2, dropout=0.1)
    assert [type(m).__name__ for m in net.blocks[0]] == ["Linear", "BatchNorm1d", "Tanh", "Dropout"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_hidden": 0}, "Expected n_hidden to be an integer >= 1, but got 0"),
        ({"n_embd": -1}, "Expected n_embd to be an integer >= 1"),
        ({"n_layers": 0}, "Expected n_layers to be an integer >= 1"),
        ({"block_size": 0}, "Expected block_size to be an integer >= 1"),
        ({"init": "xavier"}, "Expected init to be one of pytorch, naive, tanh_fix, kaiming, but got 'xavier'"),
        ({"activation": "swish"}, "Expected activation to be one of tanh, relu"),
        ({"dropout": 1.0}, r"Expected dropout in \[0, 1\)"),
        ({"bn_momentum": 2.0}, r"Expected bn_momentum in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLP(**({"vocab_size": 27} | kwargs))


def test_context_dropout_drops_whole_characters_in_training_only():
    net = MLP(vocab_size=27, block_size=8, n_embd=6, n_hidden=16, context_dropout=0.5)
    idx = torch.randint(0, 27, (512, 8), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    net.blocks[0].linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        emb = net.embedding(idx)
        net.train()(idx)
        net.eval()(idx)
    x = seen[0].view(512, 8, 6)
    dropped = (x == 0).all(-1)  # (B, characters)
    assert 0.45 < dropped.float().mean().item() < 0.55
    torch.testing.assert_close(x[~dropped], emb[~dropped] * 2)  # the kept ones scaled by 1 / (1 - p)
    assert torch.equal(seen[1], emb.flatten(1))  # eval: every character, unscaled
    with pytest.raises(ValueError, match="context_dropout"):
        MLP(vocab_size=27, context_dropout=1.0)
