"""Unit tests of callbacks/_activation_kinds.py: what an activation module is (its kind and range, by each rule),
what "saturated" means for a bounded one, and how a user's class is registered.

Expected kinds and ranges are written out by hand from each activation's formula; saturation specs are checked
against hand-computed ``(center, limit)`` values and against the definition applied to real outputs.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch
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
from callbacks._selection import select_modules

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
