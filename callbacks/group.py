"""``CallbackGroup``: several callbacks that Lightning dispatches to as one.

Lightning calls every hook of every callback on every step, overridden or not, each call wrapped in a
profiler context and a formatted name. For a small model four monitors then cost a noticeable share of the
step before doing any work (``benchmarks/results/``). The group receives each hook once and forwards it
only to the members that override it.

Between logged steps it does less still: members with a cadence (the monitors' public ``cadence``, a
:class:`~callbacks._cadence.Cadence`) are not called until the first of their next logged steps, and
the group sleeps like a monitor does (``callbacks._internals``).
"""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks._cadence import Alarm, Cadence, logging_step
from callbacks._internals import STEP_HOOKS, legacy_state_key, shadow_step_hooks

#: hooks whose state goes through the group itself (see `on_save_checkpoint` / `on_load_checkpoint`)
_STATE_HOOKS = ("state_dict", "load_state_dict", "on_save_checkpoint", "on_load_checkpoint")
#: every hook of this Lightning's ``Callback``: the group forwards each one that some member overrides
_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value) and not name.startswith("_") and name not in _STATE_HOOKS
)


class CallbackGroup(Callback):
    """Dispatches Lightning's hooks to several callbacks at once, calling only the hooks each overrides.

    Behaves like passing the members to ``Trainer(callbacks=...)`` in the same order (every hook, from
    ``setup`` to the test and predict hooks), with one difference: Lightning sees one callback. Each
    member's state is saved in the checkpoint under the member's own ``state_key``, exactly as if it were
    passed alone, so checkpoints move freely between grouped and ungrouped runs.

    Args:
        callbacks: the members, called in this order.

    Raises:
        ValueError: when a member is not a ``Callback``.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor

        trainer = Trainer(callbacks=[CallbackGroup([ActivationMonitor(), GradientMonitor()])])
    """

    def __init__(self, callbacks: list[Callback]) -> None:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ValueError(f"Expected every member to be a lightning Callback, but got {type(cb).__name__}.")
        self.callbacks = list(callbacks)
        self._state_key: str | None = None
        self._idle = False  # no member logs the current training step: the group's step hooks sleep
        self._alarm = Alarm()  # members are not called before its step
        # the members' cadences; the group sleeps only when every member has one
        cadences = [getattr(cb, "cadence", None) for cb in self.callbacks]
        self._cadences: list[Cadence] | None = (
            cadences if all(isinstance(c, Cadence) for c in cadences) else None  # type: ignore[assignment]
        )
        # per hook, the bound methods of the members that override it
        self._calls = {
            # bound from the class: a member's instance may shadow its own hooks while asleep (see `_Monitor`)
            hook: [
                getattr(type(cb), hook).__get__(cb)
                for cb in self.callbacks
                if getattr(type(cb), hook, None) is not getattr(Callback, hook)
            ]
            for hook in _HOOKS
        }

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this on every hook call: compute it once, the members are fixed
        if self._state_key is None:
            self._state_key = self._generate_state_key(members=[cb.state_key for cb in self.callbacks])
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}  # the members' states go under their own keys, see on_save_checkpoint

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        states = checkpoint.setdefault("callbacks", {})
        for cb in self.callbacks:
            state = cb.state_dict()
            if state:
                states[cb.state_key] = state
            cb.on_save_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        for cb in self.callbacks:
            cb.on_load_checkpoint(trainer, pl_module, checkpoint)
            state = states.get(cb.state_key) or states.get(legacy_state_key(cb))  # as Lightning itself reads it
            if state:
                cb.load_state_dict(state)

    def _set_idle(self, idle: bool) -> None:
        if idle != self._idle:
            self._idle = idle
            shadow_step_hooks(self, idle)

    def _batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        step = logging_step(trainer, pl_module)
        if self._alarm.sleeping(step):
            self._set_idle(True)
            return
        for call in self._calls["on_train_batch_start"]:
            call(trainer, pl_module, *args)
        if self._cadences is None:  # a member without a cadence is called on every batch
            self._set_idle(False)
            return
        active = any(c.active for c in self._cadences)
        self._set_idle(not active)
        self._alarm.set(step, active, min(c.next_active_step(step + 1) for c in self._cadences))


def _forward(hook: str) -> Any:
    def method(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        self._alarm.reset()  # anything but a training step (epoch start, validation, ...) may change the plan
        self._set_idle(False)
        for call in self._calls[hook]:
            call(*args, **kwargs)

    def step_hook(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        if self._idle:  # no member logs this step: their step hooks would all return at once
            return
        for call in self._calls[hook]:
            call(*args, **kwargs)

    def batch_start(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        self._batch_start(*args, **kwargs)

    fn = batch_start if hook == "on_train_batch_start" else step_hook if hook in STEP_HOOKS else method
    fn.__name__ = hook
    fn.__doc__ = f"Calls ``{hook}`` of the members that override it."
    return fn


for _hook in _HOOKS:
    setattr(CallbackGroup, _hook, _forward(_hook))
