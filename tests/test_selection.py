"""Unit tests of callbacks/_selection.py: which modules and parameters a monitor watches (by type, by name pattern,
compiled or not), the checks of its arguments, and the one-line suggestion when the default selection finds nothing.
"""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks import _activation_kinds
from callbacks._selection import (
    check_patterns,
    check_specs,
    empty_selection_message,
    select_modules,
    select_parameters,
)


@pytest.fixture(autouse=True)
def _empty_registry(monkeypatch):
    """Every test starts with no registered class and leaves none behind."""
    monkeypatch.setattr(_activation_kinds, "_REGISTRY", {})


# ---------------------------------------------------------------------------------------------- specs and patterns
class Blocks(nn.Module):
    """Two blocks of fc -> act -> out, a head; names like a GPT's."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(4, 8), "act": nn.GELU(), "out": nn.Linear(8, 4)}) for _ in range(2)
        )
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (None, ["blocks.0.act", "blocks.1.act"]),
        ((nn.Linear,), ["blocks.0.fc", "blocks.0.out", "blocks.1.fc", "blocks.1.out", "head"]),
        (("blocks.*.fc",), ["blocks.0.fc", "blocks.1.fc"]),
        (("blocks.1.*",), ["blocks.1.fc", "blocks.1.act", "blocks.1.out"]),
        (("head", nn.GELU), ["blocks.0.act", "blocks.1.act", "head"]),
        (("nothing*",), []),
        ((), []),
    ],
)
def test_select_modules(specs, expected):
    assert [n for n, _ in select_modules(Blocks(), specs)] == expected


def test_check_specs():
    assert check_specs(None, "modules") is None
    assert check_specs(nn.Tanh, "modules") == (nn.Tanh,)
    assert check_specs("fc*", "modules") == ("fc*",)
    assert check_specs([nn.Tanh, "fc*"], "modules") == (nn.Tanh, "fc*")


@pytest.mark.parametrize("bad", [[nn.Tanh()], [int], [3], ["ok", None]])
def test_check_specs_bad_input(bad):
    with pytest.raises(ValueError, match=r"Expected `modules` to hold `nn.Module` subclasses or name patterns"):
        check_specs(bad, "modules")


def test_check_patterns_and_select_parameters():
    assert check_patterns(None, "params") is None and check_patterns("*.weight", "params") == ("*.weight",)
    with pytest.raises(ValueError, match=r"Expected `params` to hold name patterns \(str\), but got 3"):
        check_patterns(["a", 3], "params")
    net = Blocks()
    net.head.bias.requires_grad_(False)
    assert select_parameters(net, None, 2) == [f"blocks.{i}.{n}.weight" for i in range(2) for n in ("fc", "out")] + [
        "head.weight"
    ]
    assert select_parameters(net, ("head.*",), 1) == ["head.weight"]  # the frozen bias is left out


# ---------------------------------------------------------------------------------------------- functional models
class FunctionalGPTish(nn.Module):
    """Activations only as function calls: nothing for the default selection to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.h = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(4), "fc": nn.Linear(4, 4)}) for _ in range(3))
        self.drop = nn.Dropout(0.0)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx)
        for block in self.h:
            x = x + F.gelu(block["fc"](block["ln"](x)))
        return self.drop(x)


def _suggested_modules(message: str) -> list[list]:
    """The `modules=[...]` arguments a message suggests, evaluated (types resolved in torch.nn)."""
    return [eval(arg, {"nn": nn}) for arg in re.findall(r"\(modules=(\[[^\]]*\])\)", message)]


def test_empty_selection_message_for_a_functional_model():
    model = FunctionalGPTish()
    assert list(select_modules(model, None)) == []
    msg = empty_selection_message(model, "GradientMonitor")
    assert "\n" not in msg
    assert msg.startswith("GradientMonitor found no activation module in FunctionalGPTish")
    # the distinct types, most common first (containers left out)
    assert "(it has 3 LayerNorm, 3 Linear, 1 Embedding, 1 Dropout)" in msg
    # the layers with a weight matrix (not the embedding): Linear, although LayerNorm is as common and comes first
    suggestions = _suggested_modules(msg)
    assert suggestions == [[nn.Linear], ["h.*.fc"]]
    for spec in suggestions:  # each suggestion really selects the three layers
        assert [n for n, _ in select_modules(model, check_specs(spec, "modules"))] == [f"h.{i}.fc" for i in range(3)]


def test_empty_selection_message_falls_back_to_norms_then_any_leaf():
    norms = nn.Sequential(nn.LayerNorm(4), nn.Dropout(), nn.LayerNorm(4), nn.Dropout())
    # "*" would select the dropouts too: the names themselves
    assert _suggested_modules(empty_selection_message(norms, "ActivationMonitor")) == [[nn.LayerNorm], ["0", "2"]]
    drops = nn.Sequential(nn.Dropout(), nn.Embedding(3, 2))  # an embedding's output is no layer output
    assert _suggested_modules(empty_selection_message(drops, "ActivationMonitor")) == [[nn.Embedding], ["1"]]


def test_compiled_names():
    """A compiled submodule: the pattern is suggested and matched without `_orig_mod.`, as the tags show it."""
    model = nn.Module()
    model.net = torch.compile(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))  # compiles lazily: nothing runs
    assert [n for n, _ in select_modules(model, ("net.*",))] == ["net._orig_mod.0", "net._orig_mod.1"]
    assert [n for n, _ in select_modules(model, ("net",))] == ["net", "net._orig_mod"]  # the wrapper and its module
    assert [n for n, _ in select_modules(model, ("net._orig_mod.*",))] == ["net._orig_mod.0", "net._orig_mod.1"]
    assert [n for n, _ in select_modules(model, ("*_orig_mod",))] == ["net._orig_mod"]
    msg = empty_selection_message(model, "ActivationMonitor")
    assert _suggested_modules(msg) == [[nn.Linear], ["net.*"]]


def test_empty_selection_message_suggests_the_library_type_and_real_names():
    """A type outside torch.nn is named bare; the pattern comes from the model's own names."""

    class Conv1D(nn.Module):  # like transformers' GPT-2 Conv1D
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2, 2))

    model = nn.Module()
    model.layers = nn.ModuleList(nn.ModuleDict({"c_fc": Conv1D(), "c_proj": Conv1D()}) for _ in range(2))
    model.lm_head = nn.Linear(2, 2)
    msg = empty_selection_message(model, "ActivationMonitor")
    assert "(it has 4 Conv1D, 1 Linear)" in msg
    assert "ActivationMonitor(modules=[Conv1D])" in msg
    assert 'ActivationMonitor(modules=["layers.*.c_fc"])' in msg


def test_empty_selection_message_without_submodules():
    msg = empty_selection_message(nn.Module(), "ActivationMonitor")
    assert msg == (
        "ActivationMonitor found no activation module in Module: it has no submodule. Pass `modules=[...]`"
        " (types or name patterns) to choose some."
    )
