"""Which modules and parameters the monitors watch, and what "saturated" / "dead" mean for each."""

from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase

from torch import nn

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
#: the default selection: every element-wise activation module
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


def output_range(module: nn.Module) -> tuple[float, float] | None:
    """The ``(low, high)`` range of a bounded activation's output, or ``None``."""
    if isinstance(module, nn.Hardtanh):  # also ReLU6, which is rather ReLU-like: see `is_relu_like`
        return (float(module.min_val), float(module.max_val))
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return (-1.0, 1.0)
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return (0.0, 1.0)
    return None


def is_relu_like(module: nn.Module) -> bool:
    return isinstance(module, RELU_LIKE)


def saturation_spec(module: nn.Module, threshold: float) -> tuple[float, float] | None:
    """``(center, limit)`` such that an output ``y`` is saturated when ``|y - center| > limit``.

    For tanh that is ``|y| > threshold``; for sigmoid ``|2y - 1| > threshold``. ReLU6 counts as
    ReLU-like (its zeros are "dead", not saturated), so it has no saturation.
    """
    if isinstance(module, nn.ReLU6):
        return None
    bounds = output_range(module)
    if bounds is None:
        return None
    low, high = bounds
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
    """Yields ``(qualified name, module)`` for the modules matched by any spec (default: activations)."""
    specs = specs if specs is not None else ACTIVATIONS
    types = tuple(s for s in specs if isinstance(s, type))
    patterns = [s for s in specs if isinstance(s, str)]
    for name, module in root.named_modules():
        if not name:
            continue
        if (types and isinstance(module, types)) or any(fnmatchcase(name, p) for p in patterns):
            yield name, module


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
