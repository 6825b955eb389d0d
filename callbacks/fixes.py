"""Apply a health report's actions to any LightningModule and its optimizer, and undo them.

Every problem finding of a :class:`~callbacks.HealthMonitor` carries an :class:`~callbacks.judges.base.Action`
beside its sentence. Four kinds are generic, applicable to a model this package knows nothing about:

- ``scale_lr``: the learning rate times ``value``, for the whole model or for named parameters (their parameter
  group is split: the named ones get a group of their own, with the same settings; an LR scheduler's per-group
  lists, ``base_lrs`` and LambdaLR's ``lr_lambdas``, follow);
- ``scale_layer``: a named module's parameters (weight and bias) times ``value``;
- ``init``: the layer feeding each named activation (itself, if it has a weight matrix) re-initialised at
  ``std = gain / sqrt(fan_in)`` (Kaiming, the activation's gain), its bias zeroed; with no names, every hidden
  ``Linear``/``Conv`` (the last ``Linear``, the output layer, is left alone). A layer with a normalisation
  (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) between it and its activation is re-initialised by its own
  ``reset_parameters()`` instead: the normalisation makes the forward pass blind to the weight's scale, so the gain
  is moot there, while the scale still sets the effective learning rate (``lr / |w|^2``); the layer's default is
  the scale the model was built and tuned with (the fault zoo's CNN: Kaiming's larger weights there trained worse
  than the zeroed layer they replaced);
- ``clip_gradients``: the Trainer's ``gradient_clip_val`` (by norm);
- ``unfreeze``: the named modules' parameters get ``requires_grad=True``; one that is in no parameter group of an
  optimizer joins a new group with the first group's settings (its LR scheduler's per-group lists follow).

The other kinds (``normalise``, ``activation``) change the architecture: the model must be rebuilt (``train.py``
has a flag for each, see ``lightning_makemore/heal.py``); :func:`applicable` leaves them out.

Use it as a callback on a fresh fit (:class:`ApplyFixes`, applied when training starts, once the optimizers
exist), or call :func:`apply_actions` yourself; ``undo()`` puts back what was there when it was applied (weights,
parameter groups, learning rates, the clipping), e.g. to compare. Left out on purpose: choosing which fixes to
keep (the repair loop does that by retraining) and anything needing the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from callbacks.judges.base import Action, Finding

#: the kinds applied here; the others need the model rebuilt
GENERIC = ("scale_lr", "scale_layer", "init", "clip_gradients", "unfreeze")
#: Kaiming's gain per activation module (the lecture's), 1 for anything else
GAINS: dict[type[nn.Module], float] = {
    nn.Tanh: 5 / 3,
    nn.ReLU: math.sqrt(2.0),
    nn.LeakyReLU: math.sqrt(2.0),
    nn.GELU: math.sqrt(2.0),
    nn.SiLU: math.sqrt(2.0),
}
_ACTIVATIONS = (nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid)
#: normalisation layers: the forward pass after one does not depend on the scale of the weights before it
_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)  # fmt: skip


def actions_of(findings: Iterable[Finding]) -> list[Action]:
    """The actions of the problem findings, each once (same kind and targets: the first), in the order found.

    Two learning-rate scalings of the same parameters (a loss spike's ``× 0.3`` during the fit, the end-of-fit
    advice's ``× 0.1``) become one: the larger move when they agree in direction, else the later (the end-of-fit
    advice weighs the whole fit).
    """
    seen: dict[tuple[str, tuple[str, ...]], Action] = {}
    for f in findings:
        if f.severity != "problem" or f.action is None:
            continue
        a, key = f.action, (f.action.kind, f.action.targets)
        if key not in seen:
            seen[key] = a
        elif a.kind == "scale_lr":
            old, new = math.log(float(seen[key].value)), math.log(float(a.value))  # type: ignore[arg-type]
            if old * new <= 0 or abs(new) > abs(old):
                seen[key] = a
    return list(seen.values())


def applicable(actions: Iterable[Action]) -> list[Action]:
    """The generic ones among ``actions`` (see the module docstring)."""
    return [a for a in actions if a.kind in GENERIC]


class Applied:
    """What :func:`apply_actions` changed; :meth:`undo` puts it back (last change first)."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self._undo: list[Callable[[], None]] = []

    def undo(self) -> None:
        """Restores the weights, parameter groups, learning rates and clipping as they were when applied."""
        while self._undo:
            self._undo.pop()()
        self.actions = []


def apply_actions(
    module: nn.Module,
    actions: Sequence[Action],
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[Any] = (),
    trainer: pl.Trainer | None = None,
    seed: int = 0,
) -> Applied:
    """Applies the generic ``actions`` to ``module`` (parameter and module names are ``module``'s), its
    ``optimizers``, their LR ``schedulers`` and the ``trainer`` (clipping).

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        actions: the actions; a kind that is not generic raises.
        optimizers: the optimizers whose learning rates ``scale_lr`` changes.
        schedulers: LR schedulers of those optimizers (their ``base_lrs`` follow the groups).
        trainer: for ``clip_gradients``.
        seed: the random generator's seed for ``init``'s new weights.

    Returns:
        what was changed, with ``undo()``.

    Raises:
        ValueError: an action that is not generic, a name not in ``module``, ``scale_lr`` without optimizers or
            ``clip_gradients`` without a trainer.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> applied = apply_actions(net, [Action("scale_lr", ("2.weight", "2.bias"), 0.5)], [opt])
        >>> [(len(g["params"]), g["lr"]) for g in opt.param_groups]
        [(2, 0.1), (2, 0.05)]
        >>> applied.undo(); [(len(g["params"]), g["lr"]) for g in opt.param_groups]
        [(4, 0.1)]
    """
    applied = Applied()
    generator = torch.Generator().manual_seed(seed)
    try:
        for action in actions:
            if action.kind == "scale_lr":
                undo = _scale_lr(module, action, optimizers, schedulers)
            elif action.kind == "scale_layer":
                undo = _scale_layer(module, action)
            elif action.kind == "init":
                undo = _init(module, action, generator)
            elif action.kind == "clip_gradients":
                undo = _clip(trainer, action)
            elif action.kind == "unfreeze":
                undo = _unfreeze(module, action, optimizers, schedulers)
            else:
                raise ValueError(
                    f"Expected a generic action ({', '.join(GENERIC)}), but got {action.kind!r}: it changes the"
                    " architecture, so rebuild the model with it (train.py has a flag for it)."
                )
            applied._undo.append(undo)
            applied.actions.append(action)
    except BaseException:
        applied.undo()
        raise
    return applied


class ApplyFixes(Callback):
    """Applies generic actions when training starts (the optimizers and schedulers exist by then).

    Args:
        actions: the actions (e.g. ``actions_of(monitor.findings)`` of an earlier fit, through :func:`applicable`).
        seed: the seed of ``init``'s new weights.

    Example::

        trainer = L.Trainer(callbacks=[HealthMonitor(), ApplyFixes(applicable(actions_of(old.findings)))])
    """

    def __init__(self, actions: Sequence[Action], seed: int = 0) -> None:
        bad = [a.kind for a in actions if a.kind not in GENERIC]
        if bad:
            raise ValueError(f"Expected generic actions ({', '.join(GENERIC)}), but got {', '.join(bad)}.")
        self.actions, self.seed = list(actions), seed
        self.applied: Applied | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        self.applied = apply_actions(pl_module, self.actions, trainer.optimizers, schedulers, trainer, self.seed)


# ------------------------------------------------------------------------------------------ the actions
def _parameters(module: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    params = dict(module.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"Expected parameter names of the model, but got {', '.join(missing)}.")
    return [params[n] for n in names]


def _module(module: nn.Module, name: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        raise ValueError(f"Expected a module name of the model, but got {name!r}.") from None


#: an LR scheduler's lists with one entry per parameter group
_PER_GROUP = ("base_lrs", "lr_lambdas", "_last_lr")


def _restore_schedulers(schedulers: Sequence[Any]) -> Callable[[], None]:
    """What puts back the schedulers' per-group lists as they are now."""
    saved = [(s, {k: list(getattr(s, k)) for k in _PER_GROUP if hasattr(s, k)}) for s in schedulers]

    def undo() -> None:
        for sched, lists in saved:
            for key, values in lists.items():
                setattr(sched, key, list(values))

    return undo


def _new_group(opt: Any, schedulers: Sequence[Any], like: int) -> None:
    """The schedulers of ``opt`` follow a group just appended to it: its entries copied from group ``like``."""
    for sched in (s for s in schedulers if getattr(s, "optimizer", None) is opt):
        for key in _PER_GROUP:
            if hasattr(sched, key):
                getattr(sched, key).append(getattr(sched, key)[like])


def _scale_lr(module: nn.Module, action: Action, optimizers: Sequence[Any], schedulers: Sequence[Any]) -> Callable:
    if not optimizers:
        raise ValueError("scale_lr needs the optimizers: pass `optimizers=` (a Trainer's `trainer.optimizers`).")
    factor = float(action.value)  # type: ignore[arg-type]
    chosen = {id(p) for p in _parameters(module, action.targets)} if action.targets else None
    saved_groups = [(opt, [dict(g, params=list(g["params"])) for g in opt.param_groups]) for opt in optimizers]
    restore_schedulers = _restore_schedulers(schedulers)
    for opt in optimizers:
        sched = [s for s in schedulers if getattr(s, "optimizer", None) is opt]
        for i, group in enumerate(list(opt.param_groups)):
            moved = [p for p in group["params"] if chosen is None or id(p) in chosen]
            if not moved:
                continue
            if len(moved) < len(group["params"]):  # split: the chosen ones get a group of their own
                group["params"] = [p for p in group["params"] if id(p) not in chosen]  # type: ignore[operator]
                group = dict(group, params=moved)
                opt.param_groups.append(group)
                _new_group(opt, schedulers, i)
                i = len(opt.param_groups) - 1
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
            for s in sched:
                if hasattr(s, "base_lrs"):
                    s.base_lrs[i] *= factor

    def undo() -> None:
        for opt, groups in saved_groups:
            opt.param_groups[:] = [dict(g, params=list(g["params"])) for g in groups]
        restore_schedulers()

    return undo


def _unfreeze(module: nn.Module, action: Action, optimizers: Sequence[Any], schedulers: Sequence[Any]) -> Callable:
    params = [p for name in action.targets for p in _module(module, name).parameters()]
    flags = [p.requires_grad for p in params]
    saved_groups = [(opt, len(opt.param_groups)) for opt in optimizers]
    restore_schedulers = _restore_schedulers(schedulers)
    for p in params:
        p.requires_grad_(True)
    for opt in optimizers:
        present = {id(q) for g in opt.param_groups for q in g["params"]}
        missing = [p for p in params if id(p) not in present]
        if not missing:
            continue
        opt.add_param_group(dict({k: v for k, v in opt.param_groups[0].items() if k != "params"}, params=missing))
        _new_group(opt, schedulers, 0)

    def undo() -> None:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for opt, n in saved_groups:
            del opt.param_groups[n:]
        restore_schedulers()

    return undo


def _scale_layer(module: nn.Module, action: Action) -> Callable:
    factor = float(action.value)  # type: ignore[arg-type]
    params = [p for name in action.targets for p in _module(module, name).parameters()]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.mul_(factor)
    return _restorer(params, saved)


def _init(module: nn.Module, action: Action, generator: torch.Generator) -> Callable:
    layers = [_feeding(module, name) for name in action.targets] if action.targets else _hidden_layers(module)
    params = [p for layer, *_ in layers for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for layer, gain, normalised in layers:
            if normalised and callable(getattr(layer, "reset_parameters", None)):
                with torch.random.fork_rng(devices=[]):  # the layer's default, drawn from `generator`'s stream
                    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                    layer.reset_parameters()
                continue
            fan_in = layer.weight[0].numel()  # inputs per output unit (a Conv's in_channels * kernel size)
            new = torch.randn(layer.weight.shape, generator=generator) * gain / math.sqrt(fan_in)
            layer.weight.copy_(new)
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
    return _restorer(params, saved)


def _clip(trainer: pl.Trainer | None, action: Action) -> Callable:
    if trainer is None:
        raise ValueError("clip_gradients needs the Trainer: pass `trainer=` (or use the ApplyFixes callback).")
    before = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
    trainer.gradient_clip_val = float(action.value)  # type: ignore[arg-type]
    trainer.gradient_clip_algorithm = "norm"

    def undo() -> None:
        trainer.gradient_clip_val, trainer.gradient_clip_algorithm = before

    return undo


def _restorer(params: list[torch.Tensor], saved: list[torch.Tensor]) -> Callable:
    def undo() -> None:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)

    return undo


def _weighted(m: nn.Module) -> bool:
    return (
        isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2 and not isinstance(m, nn.Embedding)
    )


def _feeding(module: nn.Module, name: str) -> tuple[nn.Module, float, bool]:
    """The layer with a weight matrix that feeds ``name`` (itself if it has one), the gain of ``name``, and whether
    a normalisation layer sits between them (in the order the modules are registered)."""
    target = _module(module, name)
    gain = GAINS.get(type(target), 1.0)
    if _weighted(target):
        return target, gain, False
    before, normalised = None, False
    for n, m in module.named_modules():
        if n == name:
            break
        if _weighted(m):
            before, normalised = m, False
        elif isinstance(m, _NORMS):
            normalised = True
    if before is None:
        raise ValueError(f"Expected a layer with weights before {name!r}, but found none.")
    return before, gain, normalised


def _hidden_layers(module: nn.Module) -> list[tuple[nn.Module, float, bool]]:
    """Every Linear/Conv but the last Linear, each with the gain of the first activation after it (1 if none), and
    whether a normalisation layer comes before that activation."""
    modules = list(module.modules())
    layers = [m for m in modules if _weighted(m)]
    if layers and isinstance(layers[-1], nn.Linear):
        layers = layers[:-1]  # the output layer: no activation after it, its scale is the softmax's business
    found = []
    for layer in layers:
        after = modules[modules.index(layer) + 1 :]
        gain, normalised = 1.0, False
        for m in after:
            if _weighted(m):
                break
            if isinstance(m, _NORMS):
                normalised = True
            if isinstance(m, _ACTIVATIONS):
                gain = GAINS.get(type(m), 1.0)
                break
        found.append((layer, gain, normalised))
    return found
