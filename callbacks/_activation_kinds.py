"""What an activation module is, and what "saturated" / "dead" mean for each kind of activation.

The monitors' default selection (``callbacks._selection``) is every *activation module*. A module is one when
the first of these rules that knows its class says so (each gives it a kind):

1. a class registered with :func:`register_activation` (or a subclass of one);
2. a ``torch.nn`` activation (``nn.Tanh``, ``nn.ReLU``, ``nn.GELU``, ...; a subclass counts as its base);
3. an activation class of a library the model uses, by type, resolved only once the library is imported
   (a model holding one of its modules has imported it; ``callbacks`` never imports it):
   Hugging Face ``transformers.activations`` (``NewGELUActivation``, ``GELUActivation``, ...);
4. by name, for classes nobody registered (``class Swish(nn.Module)``): a leaf module (no child modules)
   whose class name, lowercased, with ``_`` and a trailing ``Activation`` / ``Act`` removed, is a known
   activation name (``swish``, ``newgelu``, ``quickgelu``, ``tanh``, ``sigmoid``, ... see ``_BY_NAME``).

The kind says what the monitor measures on the output:

- ``"bounded"`` (tanh, sigmoid, hardtanh, ...): *saturation*, the share of outputs near the ends of ``range``;
- ``"relu_like"`` (ReLU and its smooth cousins: GELU, SiLU/Swish, Mish, ELU, ...): *dead units*, never
  positive over a batch. Clipped ones (ReLU6, HF's ``ClippedGELUActivation``) keep their range for
  :func:`output_range` but get no saturation: their low end is "dead", not saturated;
- ``"other"`` (softplus, GLU, shrinks, identity-like slots such as HF's ``LinearActivation``): mean/std only.

:func:`register_activation` (public: ``callbacks.register_activation``) adds a class of the user's to rule 1.
"""

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Literal

from torch import nn

Kind = Literal["bounded", "relu_like", "other"]
KINDS: tuple[Kind, ...] = ("bounded", "relu_like", "other")
Range = tuple[float, float]
#: a fixed range, or how to read it from the instance (``nn.Hardtanh(min_val, max_val)``)
_RangeRule = Range | Callable[[nn.Module], Range] | None

#: activations whose output is bounded: saturation is measured against their range
BOUNDED: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
#: activations that can be "dead" (never positive over a batch)
RELU_LIKE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)
#: the ``torch.nn`` element-wise activations (the default selection adds libraries' and users' classes)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    *BOUNDED,
    *RELU_LIKE,
    nn.Softplus,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Threshold,
    nn.GLU,
)


@dataclass(frozen=True)
class ActivationInfo:
    """What an activation module's output means: its kind and, if bounded or clipped, its ``(low, high)`` range."""

    kind: Kind
    range: Range | None = None


def _hardtanh_range(module: nn.Module) -> Range:
    return (float(module.min_val), float(module.max_val))


def _min_max_range(module: nn.Module) -> Range:
    return (float(module.min), float(module.max))


_TORCH: dict[type[nn.Module], tuple[Kind, _RangeRule]] = {
    nn.Tanh: ("bounded", (-1.0, 1.0)),
    nn.Softsign: ("bounded", (-1.0, 1.0)),
    nn.Sigmoid: ("bounded", (0.0, 1.0)),
    nn.Hardsigmoid: ("bounded", (0.0, 1.0)),
    nn.Hardtanh: ("bounded", _hardtanh_range),
    nn.ReLU6: ("relu_like", _hardtanh_range),  # a Hardtanh(0, 6): the MRO walk finds ReLU6 first
    **{t: ("relu_like", None) for t in RELU_LIKE if t is not nn.ReLU6},
    **{t: ("other", None) for t in ACTIVATIONS if t not in BOUNDED and t not in RELU_LIKE},
}

#: activation classes of libraries, by module and class name; looked up only in libraries already imported.
#: Names a library version lacks are skipped (``PytorchGELUTanh`` is ``GELUTanh``'s older name).
_LIBRARIES: dict[str, dict[str, tuple[Kind, _RangeRule]]] = {
    "transformers.activations": {
        "GELUActivation": ("relu_like", None),
        "NewGELUActivation": ("relu_like", None),  # GPT-2's "gelu_new"
        "FastGELUActivation": ("relu_like", None),
        "QuickGELUActivation": ("relu_like", None),  # x * sigmoid(1.702 x)
        "AccurateGELUActivation": ("relu_like", None),
        "GELUTanh": ("relu_like", None),
        "PytorchGELUTanh": ("relu_like", None),
        "SiLUActivation": ("relu_like", None),
        "MishActivation": ("relu_like", None),
        "ReLUSquaredActivation": ("relu_like", None),  # relu(x) ** 2: zero below 0
        "ClippedGELUActivation": ("relu_like", _min_max_range),  # "gelu_10": clip(gelu(x), -10, 10)
        "LaplaceActivation": ("bounded", (0.0, 1.0)),  # 0.5 * (1 + erf(...)): a CDF, like a sigmoid
        "LinearActivation": ("other", None),  # the identity, in the slot where the config put an activation
        "SqrtSoftplusActivation": ("other", None),  # always positive: never "dead"
        "XIELUActivation": ("other", None),  # positive for large negative inputs too: "dead" does not apply
    },
}

_BOUNDED_PM1: tuple[Kind, Range] = ("bounded", (-1.0, 1.0))
_BOUNDED_01: tuple[Kind, Range] = ("bounded", (0.0, 1.0))
#: normalised class names (see `_normalise`) of activations that nobody registered: rule 4
_BY_NAME: dict[str, tuple[Kind, Range | None]] = {
    **dict.fromkeys(("tanh", "hardtanh", "softsign", "sine"), _BOUNDED_PM1),
    **dict.fromkeys(("sigmoid", "hardsigmoid", "hsigmoid", "laplace"), _BOUNDED_01),
    **dict.fromkeys(
        (
            "relu",
            "relu6",
            "leakyrelu",
            "prelu",
            "rrelu",
            "elu",
            "celu",
            "selu",
            "gelu",
            "newgelu",
            "gelunew",
            "fastgelu",
            "gelufast",
            "quickgelu",
            "accurategelu",
            "approxgelu",
            "gelutanh",
            "tanhgelu",
            "pytorchgelutanh",
            "silu",
            "swish",
            "mish",
            "hardswish",
            "hswish",
            "relusquared",
            "squaredrelu",
            "relu2",
        ),
        ("relu_like", None),
    ),
    **dict.fromkeys(
        (
            "softplus",
            "sqrtsoftplus",
            "logsigmoid",
            "tanhshrink",
            "softshrink",
            "hardshrink",
            "glu",
            "geglu",
            "reglu",
            "swiglu",
            "xielu",
        ),
        ("other", None),
    ),
}

#: rule 1: the user's classes (`register_activation`)
_REGISTRY: dict[type[nn.Module], tuple[Kind, Range | None]] = {}


def _check_range(value: object, kind: Kind) -> Range | None:
    if value is None:
        if kind == "bounded":
            raise ValueError(
                "Expected `range=(low, high)` for kind='bounded' (saturation is measured against it), but got None."
            )
        return None
    if kind == "other":
        raise ValueError(
            f"Expected no `range` for kind='other' (pass kind='bounded' to measure saturation), but got {value!r}."
        )
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if not ok or not (math.isfinite(value[0]) and math.isfinite(value[1]) and value[0] < value[1]):
        raise ValueError(f"Expected `range` to be (low, high) with finite low < high, but got {value!r}.")
    return (float(value[0]), float(value[1]))


def register_activation(cls: type[nn.Module], kind: Kind, range: Range | None = None) -> type[nn.Module]:
    """Makes the monitors' default selection watch ``cls`` (and its subclasses) as an activation of ``kind``.

    Registration takes precedence over every other rule, so it also corrects a class the built-in rules get
    wrong. It applies to monitors whose fit starts afterwards.

    Args:
        cls: the activation module class.
        kind: ``"bounded"`` (saturation is measured against ``range``), ``"relu_like"`` (dead units are
            counted) or ``"other"`` (mean and std only).
        range: ``(low, high)`` of the output; required for ``"bounded"``, optional for ``"relu_like"``
            (a clipped ReLU: reported by :func:`output_range`, no saturation), not allowed for ``"other"``.

    Returns:
        ``cls``, unchanged.

    Raises:
        ValueError: if ``cls`` is not an ``nn.Module`` subclass, ``kind`` is unknown or ``range`` is invalid.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> class Squash(nn.Module):  # a name no rule knows
        ...     def forward(self, x):
        ...         return x / (1 + x.abs())
        >>> activation_info(Squash()) is None
        True
        >>> _ = register_activation(Squash, kind="bounded", range=(-1, 1))
        >>> activation_info(Squash())
        ActivationInfo(kind='bounded', range=(-1.0, 1.0))
        >>> saturation_spec(Squash(), threshold=0.97)  # saturated when |y - 0.0| > 0.97
        (0.0, 0.97)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Expected `cls` to be an nn.Module subclass, but got {cls!r}.")
    if kind not in KINDS:
        raise ValueError(f"Expected `kind` to be one of {', '.join(map(repr, KINDS))}, but got {kind!r}.")
    _REGISTRY[cls] = (kind, _check_range(range, kind))
    return cls


@cache
def _library_table(library: ModuleType) -> dict[type, tuple[Kind, _RangeRule]]:
    table = _LIBRARIES[library.__name__]
    return {cls: entry for name, entry in table.items() if isinstance(cls := getattr(library, name, None), type)}


def _normalise(class_name: str) -> str:
    """``"NewGELUActivation"`` -> ``"newgelu"``, ``"Swish_Act"`` -> ``"swish"``."""
    name = re.sub(r"[^a-z0-9]", "", class_name.lower())
    for suffix in ("activation", "act"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def activation_info(module: nn.Module) -> ActivationInfo | None:
    """The kind (and range) of an activation module, or ``None`` if ``module`` is not one (see the module docs).

    Example::

        >>> from torch import nn
        >>> activation_info(nn.Hardtanh(-2.0, 2.0))
        ActivationInfo(kind='bounded', range=(-2.0, 2.0))
        >>> activation_info(nn.GELU())
        ActivationInfo(kind='relu_like', range=None)
        >>> class Swish(nn.Module):  # by name: a leaf module called like an activation
        ...     def forward(self, x):
        ...         return x * x.sigmoid()
        >>> activation_info(Swish())
        ActivationInfo(kind='relu_like', range=None)
        >>> activation_info(nn.Linear(2, 2)) is None
        True
    """
    libraries = [lib for name in _LIBRARIES if (lib := sys.modules.get(name)) is not None]
    tables = [_REGISTRY, _TORCH, *(_library_table(lib) for lib in libraries)]
    for cls in type(module).__mro__:  # the most specific class that any rule knows wins
        for table in tables:
            if cls in table:
                kind, rule = table[cls]
                return ActivationInfo(kind, rule(module) if callable(rule) else rule)
    if next(module.children(), None) is None:
        entry = _BY_NAME.get(_normalise(type(module).__name__))
        if entry is not None:
            return ActivationInfo(*entry)
    return None


def output_range(module: nn.Module) -> Range | None:
    """The ``(low, high)`` range of a bounded (or clipped ReLU-like) activation's output, or ``None``.

    Example::

        >>> from torch import nn
        >>> output_range(nn.Sigmoid()), output_range(nn.ReLU6()), output_range(nn.GELU())
        ((0.0, 1.0), (0.0, 6.0), None)
    """
    info = activation_info(module)
    return info.range if info is not None else None


def is_relu_like(module: nn.Module) -> bool:
    """Whether the module's output can have dead units (never positive over a batch): ReLU, GELU, SiLU, ...

    Example::

        >>> from torch import nn
        >>> is_relu_like(nn.SiLU()), is_relu_like(nn.ReLU6()), is_relu_like(nn.Tanh())
        (True, True, False)
    """
    info = activation_info(module)
    return info is not None and info.kind == "relu_like"


#: ReLU-like activations whose gradient is exactly zero for every negative input (by class, and by normalised name)
_ZERO_BELOW: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
_ZERO_BELOW_NAMES = frozenset(("relu", "relu6", "relusquared", "squaredrelu", "relu2"))


def gradient_below_zero(module: nn.Module) -> Literal["none", "some"] | None:
    """For a ReLU-like module, what gradient a unit gets when its input is negative: ``"none"`` (ReLU, ReLU6,
    ReLU²: a unit never positive never learns again) or ``"some"`` (GELU, SiLU, ELU, LeakyReLU, ...: small,
    not zero); None for other modules.

    Example::

        >>> from torch import nn
        >>> gradient_below_zero(nn.ReLU()), gradient_below_zero(nn.GELU()), gradient_below_zero(nn.Tanh())
        ('none', 'some', None)
    """
    if not is_relu_like(module):
        return None
    if isinstance(module, _ZERO_BELOW) or _normalise(type(module).__name__) in _ZERO_BELOW_NAMES:
        return "none"
    return "some"


def saturation_spec(module: nn.Module, threshold: float) -> tuple[float, float] | None:
    """``(center, limit)`` such that an output ``y`` is saturated when ``|y - center| > limit``.

    For tanh that is ``|y| > threshold``; for sigmoid ``|2y - 1| > threshold``. ReLU6 counts as
    ReLU-like (its zeros are "dead", not saturated), so it has no saturation.

    Example::

        >>> from torch import nn
        >>> saturation_spec(nn.Tanh(), 0.97), saturation_spec(nn.Sigmoid(), 0.97)
        ((0.0, 0.97), (0.5, 0.485))
        >>> saturation_spec(nn.Hardtanh(-2.0, 4.0), 0.5)  # |y - 1| > 1.5: y < -0.5 or y > 2.5
        (1.0, 1.5)
        >>> saturation_spec(nn.ReLU6(), 0.97) is None
        True
    """
    info = activation_info(module)
    if info is None or info.kind != "bounded" or info.range is None:
        return None
    low, high = info.range
    return ((low + high) / 2, threshold * (high - low) / 2)
