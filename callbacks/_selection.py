"""Which modules and parameters the monitors watch, and what "saturated" / "dead" mean for each.

The default selection of ``ActivationMonitor`` / ``GradientMonitor`` is every *activation module*. A module
is one when the first of these rules that knows its class says so (each gives it a kind):

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

Functional activations (``F.gelu(x)`` inside ``forward``) cannot be hooked: :func:`empty_selection_message`
says what a model without activation modules could watch instead.
"""

import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from types import ModuleType
from typing import Literal

from torch import nn

from callbacks._compile import tag_name

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

ModuleSpec = type[nn.Module] | str


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


def check_specs(specs: Sequence[ModuleSpec] | None, arg: str) -> tuple[ModuleSpec, ...] | None:
    """Validates a user's ``modules`` argument: module types and/or fnmatch name patterns."""
    if specs is None:
        return None
    if isinstance(specs, (str, type)):
        specs = [specs]
    out = []
    for spec in specs:
        if isinstance(spec, str) or (isinstance(spec, type) and issubclass(spec, nn.Module)):
            out.append(spec)
        else:
            raise ValueError(
                f"Expected `{arg}` to hold `nn.Module` subclasses or name patterns (str), but got {spec!r}."
            )
    return tuple(out)


def select_modules(root: nn.Module, specs: tuple[ModuleSpec, ...] | None) -> Iterator[tuple[str, nn.Module]]:
    """Yields ``(qualified name, module)`` for the modules matched by any spec (default: activation modules).

    A name pattern matches the name the monitors' tags use: without ``torch.compile``'s ``_orig_mod``, so
    ``"net.fc*"`` selects ``net._orig_mod.fc1`` of a compiled ``net`` (and not the wrapper
    ``net._orig_mod``); a pattern that spells ``_orig_mod`` matches the qualified name as it is.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> [name for name, _ in select_modules(net, None)]
        ['1']
        >>> [name for name, _ in select_modules(net, (nn.Linear,))]
        ['0', '2']
        >>> [name for name, _ in select_modules(net, ("[12]",))]
        ['1', '2']
    """
    types = tuple(s for s in specs if isinstance(s, type)) if specs is not None else ()
    patterns = [s for s in specs if isinstance(s, str)] if specs is not None else []
    for name, module in root.named_modules():
        if not name:
            continue
        if specs is None:
            if activation_info(module) is not None:
                yield name, module
        elif (types and isinstance(module, types)) or any(
            fnmatchcase(name if "_orig_mod" in p else _uncompiled(name), p) for p in patterns
        ):
            yield name, module


def _uncompiled(name: str) -> str:
    """``net._orig_mod.0`` -> ``net.0`` (as `tag_name`), and the compiled module itself ``net._orig_mod`` -> ``net``."""
    return tag_name(f"{name}.")[:-1]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _type_expr(cls: type) -> str:
    return f"nn.{cls.__name__}" if getattr(nn, cls.__name__, None) is cls else cls.__name__


def empty_selection_message(root: nn.Module, callback_name: str) -> str:
    """The one-line warning for a model in which the default selection found no activation module.

    It lists the module types the model has (most common first) and suggests a ``modules=[...]`` argument
    that watches the outputs of its most common layer with parameters instead: by type, and by a name
    pattern matching the model's own names (digits become ``*``).

    Args:
        root: the model (the LightningModule) whose ``named_modules()`` were searched.
        callback_name: the monitor's class name, used in the suggestion.

    Returns:
        The message, one line.

    Example::

        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2, self.norm = nn.Linear(4, 8), nn.Linear(8, 2), nn.LayerNorm(8)
        ...     def forward(self, x):
        ...         return self.fc2(F.gelu(self.norm(self.fc1(x))))
        >>> print(empty_selection_message(Net(), "ActivationMonitor"))  # doctest: +NORMALIZE_WHITESPACE
        ActivationMonitor found no activation module in Net (it has 2 Linear, 1 LayerNorm); activations
        called as functions (F.gelu, torch.tanh) cannot be hooked: watch the layers' outputs instead, e.g.
        ActivationMonitor(modules=[nn.Linear]) or ActivationMonitor(modules=["fc*"]), or make the
        activations modules (nn.GELU()) or register your own activation class with
        register_activation(cls, kind=...).
    """
    counts: Counter[type] = Counter()
    first: dict[type, nn.Module] = {}
    names: dict[type, list[str]] = {}
    for name, module in root.named_modules():
        if name and not isinstance(module, _CONTAINERS):
            counts[type(module)] += 1
            first.setdefault(type(module), module)
            names.setdefault(type(module), []).append(name)
    head = f"{callback_name} found no activation module in {type(root).__name__}"
    if not counts:
        return f"{head}: it has no submodule. Pass `modules=[...]` (types or name patterns) to choose some."
    ranked = [cls for cls, _ in counts.most_common()]
    have = ", ".join(f"{counts[cls]} {cls.__name__}" for cls in ranked)
    # suggest the most common leaf type with a weight matrix or kernel (Linear, Conv: the layers an activation
    # follows; not an embedding), else with any parameter (a norm), else any leaf
    leaves = [cls for cls in ranked if next(first[cls].children(), None) is None]
    params = {cls: list(first[cls].parameters(recurse=False)) for cls in leaves}
    weighted = [
        cls
        for cls in leaves
        if any(p.ndim >= 2 for p in params[cls]) and not issubclass(cls, (nn.Embedding, nn.EmbeddingBag))
    ]
    target = (weighted or [cls for cls in leaves if params[cls]] or leaves or ranked)[0]
    # the pattern of the model's own names, digits as `*`, as the tags show them (without `_orig_mod.`)
    pattern = Counter(re.sub(r"\d+", "*", _uncompiled(n)) for n in names[target]).most_common(1)[0][0]
    others = [n for n, m in root.named_modules() if n and type(m) is not target]
    if any(fnmatchcase(_uncompiled(n), pattern) for n in others):  # too wide ("*" in a Sequential): exact names
        pattern = '", "'.join(_uncompiled(n) for n in names[target][:3])
    return (
        f"{head} (it has {have}); activations called as functions (F.gelu, torch.tanh) cannot be hooked:"
        f" watch the layers' outputs instead, e.g. {callback_name}(modules=[{_type_expr(target)}]) or"
        f' {callback_name}(modules=["{pattern}"]), or make the activations modules (nn.GELU()) or register'
        " your own activation class with register_activation(cls, kind=...)."
    )


def check_patterns(patterns: Sequence[str] | str | None, arg: str) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"Expected `{arg}` to hold name patterns (str), but got {p!r}.")
    return tuple(patterns)


def select_parameters(root: nn.Module, patterns: tuple[str, ...] | None, min_ndim: int) -> list[str]:
    """Names of trainable parameters with at least ``min_ndim`` dims that match a pattern (if given)."""
    return [
        name
        for name, p in root.named_parameters()
        if p.requires_grad
        and p.ndim >= min_ndim
        and (patterns is None or any(fnmatchcase(name, pat) for pat in patterns))
    ]


@dataclass(frozen=True)
class Watched:
    """A module a probe watches: its tag name (without ``torch.compile``'s ``_orig_mod.``), its label
    ``"name (Tanh)"``, the module and its qualified name in the model."""

    name: str
    label: str
    module: nn.Module
    qualified: str


def watch_modules(root: nn.Module, specs: tuple[ModuleSpec, ...] | None, owner: str) -> list[Watched]:
    """The modules ``specs`` select in ``root`` (:func:`select_modules`), each once, and one warning when there is
    none (``owner``: the monitor's name, for the message)."""
    watched: dict[str, Watched] = {}
    for qualified, module in select_modules(root, specs):
        name = tag_name(qualified)  # the same module reached through a compiled wrapper and its original: once
        watched.setdefault(name, Watched(name, f"{name} ({type(module).__name__})", module, qualified))
    if not watched:
        from callbacks._warnings import health_warning

        health_warning(
            empty_selection_message(root, owner)
            if specs is None
            else f"{owner} found no module matching"
            f" `modules=[{', '.join(getattr(m, '__name__', repr(m)) for m in specs)}]` in"
            f" {type(root).__name__}: check the types and name patterns against its `named_modules()`."
        )
    return list(watched.values())


_SKIPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _previous_leaf(root: nn.Module, qualified: str) -> tuple[str, nn.Module] | None:
    """The leaf module right before ``qualified``: the previous child of the same parent in registration order
    (``nn.Sequential``'s order, and the usual ``self.bn = ...; self.act = ...``), skipping dropout and identity
    layers; for a container, its last leaf."""
    parent_name, _, child = qualified.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
    except AttributeError:
        return None
    children = list(parent.named_children())
    names = [n for n, _ in children]
    if child not in names:
        return None
    for prev_name, prev in reversed(children[: names.index(child)]):
        leaf_name, leaf = prev_name, prev
        for sub_name, sub in prev.named_modules():
            if not list(sub.children()):
                leaf_name, leaf = f"{prev_name}.{sub_name}" if sub_name else prev_name, sub
        if isinstance(leaf, _SKIPPED):
            continue
        return f"{parent_name + '.' if parent_name else ''}{leaf_name}", leaf
    return None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: any whose class name has "Norm" in it (BatchNorm, LayerNorm, GroupNorm, RMSNorm, the
    lecture's hand-written ``BatchNorm1d``)."""
    return "norm" in type(module).__name__.lower()


def norm_before(root: nn.Module, qualified: str) -> str | None:
    """``"name (BatchNorm1d)"`` of the normalisation layer right before module ``qualified``, or None.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        >>> norm_before(net, "2"), norm_before(net, "1")
        ('1 (BatchNorm1d)', None)
    """
    prev = _previous_leaf(root, qualified)
    if prev is None or not is_norm(prev[1]):
        return None
    return f"{tag_name(prev[0])} ({type(prev[1]).__name__})"


def biases_before_batchnorm(root: nn.Module) -> list[tuple[str, str]]:
    """``(bias name, norm label)`` for every layer with a bias right before a batch normalisation, which subtracts
    the batch mean of each feature, so that bias does nothing (only the norm's own shift counts).

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8, bias=False))
        >>> biases_before_batchnorm(net)
        [('0.bias', '1 (BatchNorm1d)')]
    """
    found = []
    for name, module in root.named_modules():
        if not name or "batchnorm" not in type(module).__name__.lower():
            continue
        prev = _previous_leaf(root, name)
        bias = getattr(prev[1], "bias", None) if prev is not None else None
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            found.append((tag_name(f"{prev[0]}.bias"), f"{tag_name(name)} ({type(module).__name__})"))
    return found
