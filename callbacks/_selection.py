"""Which modules and parameters a monitor watches, the checks of its ``modules`` / ``params`` arguments, and
the warning when it finds nothing to watch.

By default ``ActivationMonitor`` / ``GradientMonitor`` watch every activation module (what one is, and its kind:
``callbacks._activation_kinds``); a ``modules=[...]`` argument selects by type or by name pattern instead.
Functional activations (``F.gelu(x)`` inside ``forward``) cannot be hooked: :func:`empty_selection_message`
says what a model without activation modules could watch instead.
"""

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from callbacks._activation_kinds import activation_info
from callbacks._compile import tag_name

ModuleSpec = type[nn.Module] | str


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
