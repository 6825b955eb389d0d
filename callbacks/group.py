"""``CallbackGroup``: several callbacks that Lightning dispatches to as one.

Lightning calls every hook of every callback on every step, overridden or not, each call wrapped in a
profiler context and a formatted name: about 7 µs per callback per hook on a CPU here, some 40 µs a
step for each callback. For a model whose whole step takes 1 ms, four monitors then cost 15 % before
doing any work. The group receives each hook once and forwards it only to the members that override it.

Between logged steps it does less still: members that say when they next log (the monitors'
``_next_active_step``) are not called until then, and the group's own step hooks become ``None`` on the
instance, which Lightning skips without a call (it calls a callback's hook only if it is callable).
"""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks._base import STEP_HOOKS, shadow_step_hooks

#: hooks forwarded to the members (those with per-step or per-fit work; the rest are rare or unused here)
_HOOKS = (
    "setup",
    "teardown",
    "on_fit_start",
    "on_fit_end",
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_start",
    "on_validation_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_sanity_check_start",
    "on_sanity_check_end",
    "on_exception",
)


class CallbackGroup(Callback):
    """Dispatches Lightning's hooks to several callbacks at once, calling only the hooks each overrides.

    Behaves like passing the members to ``Trainer(callbacks=...)`` in the same order, with one
    difference: Lightning sees one callback. Each member's state is saved in the checkpoint under the
    member's own ``state_key``, exactly as if it were passed alone, so checkpoints move freely between
    grouped and ungrouped runs.

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
        self._idle = False  # no member logs the current training step
        self._wake = -1  # members are not called before this step (-1: call them on the next batch)
        self._awake_step = -1  # except on the batches of this step
        # per hook, the bound methods of the members that override it
        self._calls = {
            # bound from the class: a member's instance may shadow its own hooks while asleep (see `_Monitor`)
            hook: [
                getattr(type(cb), hook).__get__(cb)
                for cb in self.callbacks
                if getattr(type(cb), hook) is not getattr(Callback, hook)
            ]
            for hook in _HOOKS
        }

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this on every hook call (about 6 a step): compute it once, the members are fixed
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
            state = states.get(cb.state_key, states.get(cb._legacy_state_key))
            if state:
                cb.load_state_dict(state)


def _set_idle(group: CallbackGroup, idle: bool) -> None:
    if idle != group._idle:
        group._idle = idle
        shadow_step_hooks(group, idle)


def _forward(hook: str) -> Any:
    def method(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        self._wake = -1  # anything but a training step (epoch start, validation, ...) may change the plan
        _set_idle(self, False)
        for call in self._calls[hook]:
            call(*args, **kwargs)

    def batch_start(self: CallbackGroup, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step < self._wake and step != self._awake_step:
            _set_idle(self, True)
            return
        for call in self._calls[hook]:
            call(trainer, *args, **kwargs)
        # a monitor says through `_active` whether it logs this step; others are always called
        idle = all(not getattr(cb, "_active", True) for cb in self.callbacks)
        _set_idle(self, idle)
        if all(hasattr(cb, "_next_active_step") for cb in self.callbacks):
            self._wake = min(cb._next_active_step(step + 1) for cb in self.callbacks)
            self._awake_step = -1 if idle else step  # all micro-batches of a logged step reach the members
        else:
            self._wake = -1

    def step_hook(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        if self._idle:  # no member logs this step: their step hooks would all return at once
            return
        for call in self._calls[hook]:
            call(*args, **kwargs)

    fn = batch_start if hook == "on_train_batch_start" else step_hook if hook in STEP_HOOKS else method
    fn.__name__ = hook
    fn.__doc__ = f"Calls ``{hook}`` of the members that override it."
    return fn


for _hook in _HOOKS:
    setattr(CallbackGroup, _hook, _forward(_hook))
