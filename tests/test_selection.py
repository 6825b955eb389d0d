"""Unit tests of callbacks/_activation_kinds.py and callbacks/_selection.py: which modules the monitors watch by
default, and what each one means.

Expected kinds and ranges are written out by hand from each activation's formula; saturation specs are checked
against hand-computed ``(center, limit)`` values and against the definition applied to real outputs.
"""

import ast
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks import _activation_kinds
from callbacks._activation_kinds import (
    ACTIVATIONS,
    ActivationInfo,
    activation_info,
    is_relu_like,
    output_range,
    register_activation,
    saturation_spec,
)
from callbacks._selection import (
    check_patterns,
    check_specs,
    empty_selection_message,
    select_modules,
    select_parameters,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _empty_registry(monkeypatch):
    """Every test starts with no registered class and leaves none behind."""
    monkeypatch.setattr(_activation_kinds, "_REGISTRY", {})


# ---------------------------------------------------------------------------------------------- torch.nn
TORCH_CASES = [
    (nn.Tanh(), "bounded", (-1.0, 1.0)),
    (nn.Softsign(), "bounded", (-1.0, 1.0)),
    (nn.Sigmoid(), "bounded", (0.0, 1.0)),
    (nn.Hardsigmoid(), "bounded", (0.0, 1.0)),
    (nn.Hardtanh(), "bounded", (-1.0, 1.0)),
    (nn.Hardtanh(-2.0, 4.0), "bounded", (-2.0, 4.0)),
    (nn.ReLU6(), "relu_like", (0.0, 6.0)),
    (nn.ReLU(), "relu_like", None),
    (nn.LeakyReLU(), "relu_like", None),
    (nn.PReLU(), "relu_like", None),
    (nn.RReLU(), "relu_like", None),
    (nn.ELU(), "relu_like", None),
    (nn.CELU(), "relu_like", None),
    (nn.SELU(), "relu_like", None),
    (nn.GELU(), "relu_like", None),
    (nn.GELU(approximate="tanh"), "relu_like", None),
    (nn.SiLU(), "relu_like", None),
    (nn.Mish(), "relu_like", None),
    (nn.Hardswish(), "relu_like", None),
    (nn.Softplus(), "other", None),
    (nn.Tanhshrink(), "other", None),
    (nn.LogSigmoid(), "other", None),
    (nn.Softshrink(), "other", None),
    (nn.Hardshrink(), "other", None),
    (nn.Threshold(0.1, 0.0), "other", None),
    (nn.GLU(), "other", None),
]


@pytest.mark.parametrize(("module", "kind", "bounds"), TORCH_CASES, ids=lambda v: type(v).__name__)
def test_torch_activations(module, kind, bounds):
    assert activation_info(module) == ActivationInfo(kind, bounds)
    assert output_range(module) == bounds
    assert is_relu_like(module) == (kind == "relu_like")


def test_every_torch_activation_has_a_case():
    assert {type(m) for m, _, _ in TORCH_CASES} == set(ACTIVATIONS)


@pytest.mark.parametrize("module", [nn.Linear(2, 2), nn.LayerNorm(2), nn.Dropout(), nn.Identity(), nn.Softmax(-1)])
def test_not_activations(module):
    assert activation_info(module) is None
    assert output_range(module) is None and saturation_spec(module, 0.97) is None and not is_relu_like(module)


def test_subclass_counts_as_its_base():
    class MyTanh(nn.Tanh):
        pass

    assert activation_info(MyTanh()) == ActivationInfo("bounded", (-1.0, 1.0))


# ---------------------------------------------------------------------------------------------- saturation
SATURATION_CASES = [
    # module, threshold, (center, limit) by hand: center = (lo + hi) / 2, limit = threshold * (hi - lo) / 2
    (nn.Tanh(), 0.97, (0.0, 0.97)),
    (nn.Softsign(), 0.9, (0.0, 0.9)),
    (nn.Sigmoid(), 0.97, (0.5, 0.485)),
    (nn.Hardsigmoid(), 0.5, (0.5, 0.25)),
    (nn.Hardtanh(-2.0, 4.0), 0.5, (1.0, 1.5)),
    (nn.ReLU6(), 0.97, None),  # ReLU-like: zeros are dead, not saturated
    (nn.ReLU(), 0.97, None),
    (nn.Softplus(), 0.97, None),
]


@pytest.mark.parametrize(("module", "threshold", "expected"), SATURATION_CASES, ids=lambda v: type(v).__name__)
def test_saturation_spec(module, threshold, expected):
    spec = saturation_spec(module, threshold)
    if expected is None:
        assert spec is None
    else:
        assert spec == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("module", "saturated"),
    [
        (nn.Tanh(), lambda y: y.abs() > 0.97),
        (nn.Sigmoid(), lambda y: (2 * y - 1).abs() > 0.97),  # the docstring's definition for sigmoid
        (nn.Hardtanh(-2.0, 4.0), lambda y: (y < -2.0 + 0.03 * 3) | (y > 4.0 - 0.03 * 3)),  # within 3 % of an end
    ],
    ids=["tanh", "sigmoid", "hardtanh"],
)
def test_saturation_spec_means_near_the_ends(module, saturated):
    """The spec applied to real outputs flags exactly the outputs near an end of the range."""
    y = module(torch.linspace(-6.0, 6.0, 2001, dtype=torch.float64))
    center, limit = saturation_spec(module, 0.97)
    flagged = (y - center).abs() > limit
    assert torch.equal(flagged, saturated(y))
    assert 0 < flagged.sum() < len(y)


# ---------------------------------------------------------------------------------------------- transformers
HF_CASES = [
    ("GELUActivation", {}, "relu_like", None),
    ("NewGELUActivation", {}, "relu_like", None),
    ("FastGELUActivation", {}, "relu_like", None),
    ("QuickGELUActivation", {}, "relu_like", None),
    ("AccurateGELUActivation", {}, "relu_like", None),
    ("GELUTanh", {}, "relu_like", None),
    ("SiLUActivation", {}, "relu_like", None),
    ("MishActivation", {}, "relu_like", None),
    ("ReLUSquaredActivation", {}, "relu_like", None),
    ("ClippedGELUActivation", {"min": -10.0, "max": 10.0}, "relu_like", (-10.0, 10.0)),
    ("LaplaceActivation", {}, "bounded", (0.0, 1.0)),
    ("LinearActivation", {}, "other", None),
    ("SqrtSoftplusActivation", {}, "other", None),
    ("XIELUActivation", {"dtype": torch.float32}, "other", None),
]


@pytest.mark.parametrize(("name", "kwargs", "kind", "bounds"), HF_CASES, ids=[c[0] for c in HF_CASES])
def test_transformers_activations(name, kwargs, kind, bounds):
    acts = pytest.importorskip("transformers.activations")
    if not hasattr(acts, name):
        pytest.skip(f"this transformers has no {name}")
    module = getattr(acts, name)(**kwargs)
    assert activation_info(module) == ActivationInfo(kind, bounds)
    assert is_relu_like(module) == (kind == "relu_like")
    if kind == "bounded":
        assert saturation_spec(module, 0.97) == pytest.approx((0.5, 0.485))
    else:
        assert saturation_spec(module, 0.97) is None


def test_every_transformers_activation_is_decided():
    """A new class in transformers.activations fails here until it gets a kind (or is ruled out on purpose)."""
    acts = pytest.importorskip("transformers.activations")
    classes = {
        name
        for name, obj in vars(acts).items()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == acts.__name__
    }
    undecided = classes - set(_activation_kinds._LIBRARIES["transformers.activations"])
    assert not undecided, f"give {sorted(undecided)} a kind in callbacks/_activation_kinds.py `_LIBRARIES`"


def test_relu_like_transformers_activations_are_zero_or_negative_below_zero():
    """What "dead" relies on: a ReLU-like output is never positive for a negative input."""
    acts = pytest.importorskip("transformers.activations")
    x = torch.linspace(-8.0, -1e-3, 500)
    for name, _, kind, _ in HF_CASES:
        if kind == "relu_like" and hasattr(acts, name):
            module = getattr(acts, name)(**dict(next(c[1] for c in HF_CASES if c[0] == name)))
            assert (module(x) <= 0).all(), name


def test_the_selection_imports_nothing():
    """Libraries are looked up in sys.modules only: selecting (and classifying) imports no module."""
    net = nn.Sequential(nn.Linear(2, 2), nn.GELU(), _user_class("Swish")())
    before = set(sys.modules)
    assert [n for n, _ in select_modules(net, None)] == ["1", "2"]
    assert activation_info(net[1]) == ActivationInfo("relu_like")
    assert set(sys.modules) == before


def test_callbacks_never_import_transformers():
    """transformers is a test extra, never a dependency of callbacks/ (checked on the source's imports)."""
    for path in sorted((ROOT / "callbacks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path.name} imports transformers"


# ---------------------------------------------------------------------------------------------- user classes
def _user_class(name: str, *, child: bool = False, param: bool = False) -> type[nn.Module]:
    def __init__(self: nn.Module) -> None:
        nn.Module.__init__(self)
        if child:
            self.proj = nn.Linear(2, 2)
        if param:
            self.beta = nn.Parameter(torch.ones(()))

    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)

    return type(name, (nn.Module,), {"__init__": __init__, "forward": forward})


@pytest.mark.parametrize(
    ("class_name", "expected"),
    [
        ("Swish", ActivationInfo("relu_like")),
        ("NewGELU", ActivationInfo("relu_like")),  # nanoGPT / minGPT
        ("QuickGELU", ActivationInfo("relu_like")),  # CLIP
        ("GELUTanh", ActivationInfo("relu_like")),  # a GELU, not a tanh
        ("SquaredReLU", ActivationInfo("relu_like")),
        ("SwishActivation", ActivationInfo("relu_like")),  # suffix removed
        ("Swish_Act", ActivationInfo("relu_like")),
        ("swish", ActivationInfo("relu_like")),
        ("Sigmoid", ActivationInfo("bounded", (0.0, 1.0))),  # timm's own Sigmoid/Tanh
        ("Tanh", ActivationInfo("bounded", (-1.0, 1.0))),
        ("HardSigmoid", ActivationInfo("bounded", (0.0, 1.0))),
        ("Sine", ActivationInfo("bounded", (-1.0, 1.0))),  # SIREN
        ("LogSigmoid", ActivationInfo("other")),  # not bounded: log(sigmoid) goes to -inf
        ("SwiGLU", ActivationInfo("other")),  # gated: the second half can be negative, "dead" does not apply
        ("Softplus", ActivationInfo("other")),
        ("MyBlock", None),
        ("Activation", None),  # the suffix alone names nothing
        ("GELUFeedForward", None),  # a name that merely contains an activation's
        ("Act", None),
    ],
)
def test_user_classes_by_name(class_name, expected):
    assert activation_info(_user_class(class_name)()) == expected


def test_name_rule_allows_learnable_scalars_but_not_children():
    assert activation_info(_user_class("Swish", param=True)()) == ActivationInfo("relu_like")  # Swish-beta
    assert activation_info(_user_class("Swish", child=True)()) is None  # a block, not an activation


def test_user_classes_in_the_default_selection():
    swish = _user_class("Swish")
    block = _user_class("GELU", child=True)
    net = nn.Sequential(nn.Linear(2, 4), swish(), block(), nn.Linear(4, 2), nn.Tanh())
    assert [n for n, _ in select_modules(net, None)] == ["1", "4"]


# ---------------------------------------------------------------------------------------------- registration
def test_register_activation():
    squash = _user_class("Squash")
    assert activation_info(squash()) is None
    assert register_activation(squash, kind="bounded", range=(-1, 1)) is squash
    assert activation_info(squash()) == ActivationInfo("bounded", (-1.0, 1.0))
    assert saturation_spec(squash(), 0.97) == pytest.approx((0.0, 0.97))

    class SubSquash(squash):
        pass

    assert activation_info(SubSquash()) == ActivationInfo("bounded", (-1.0, 1.0))
    net = nn.Sequential(nn.Linear(2, 2), SubSquash())
    assert [n for n, _ in select_modules(net, None)] == ["1"]


def test_registration_overrides_the_built_in_rules():
    swish = _user_class("Swish")
    register_activation(swish, kind="other")  # a name-matched class the user says is not ReLU-like
    assert activation_info(swish()) == ActivationInfo("other")
    register_activation(nn.ReLU6, kind="bounded", range=(0.0, 6.0))  # the user wants ReLU6's saturation
    assert saturation_spec(nn.ReLU6(), 0.5) == pytest.approx((3.0, 1.5))
    assert activation_info(nn.Hardtanh()) == ActivationInfo("bounded", (-1.0, 1.0))  # its base is unchanged


def test_register_clipped_relu_keeps_its_range_without_saturation():
    clipped = _user_class("Clipped")
    register_activation(clipped, kind="relu_like", range=(0.0, 10.0))
    assert output_range(clipped()) == (0.0, 10.0)
    assert is_relu_like(clipped()) and saturation_spec(clipped(), 0.97) is None


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((nn.Linear(2, 2),), {"kind": "other"}, r"Expected `cls` to be an nn.Module subclass, but got Linear"),
        ((int,), {"kind": "other"}, r"Expected `cls` to be an nn.Module subclass, but got <class 'int'>"),
        ((nn.Module,), {"kind": "saturating"}, r"Expected `kind` to be one of 'bounded', 'relu_like', 'other'"),
        ((nn.Module,), {"kind": "bounded"}, r"Expected `range=\(low, high\)` for kind='bounded'"),
        ((nn.Module,), {"kind": "bounded", "range": (1.0, 1.0)}, r"Expected `range` to be \(low, high\) with finite"),
        ((nn.Module,), {"kind": "bounded", "range": (0.0, float("inf"))}, r"Expected `range` to be \(low, high\)"),
        ((nn.Module,), {"kind": "bounded", "range": (0.0,)}, r"Expected `range` to be \(low, high\)"),
        ((nn.Module,), {"kind": "bounded", "range": ("a", "b")}, r"Expected `range` to be \(low, high\)"),
        ((nn.Module,), {"kind": "other", "range": (0.0, 1.0)}, r"Expected no `range` for kind='other'"),
    ],
)
def test_register_activation_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_activation(*args, **kwargs)
    assert not _activation_kinds._REGISTRY  # nothing half-registered


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
