"""``CallbackGroup``: several callbacks that Lightning dispatches to as one.

Lightning calls every hook of every callback on every step, overridden or not, each call wrapped in a profiler
context and a formatted name. For a small model four monitors then cost a noticeable share of the step before
doing any work (``benchmarks/results/``). The group receives each hook once and forwards it only to the members
that override it. Its monitors are not called: the group makes one recorder of their parts (and of the parts a
subclass adds, ``HealthMonitor``'s diagnoses), which records, reduces and writes once a step for all of them.
When every member that has step hooks is idle, the group's step hooks sleep too (``callbacks._internals``).
"""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks._internals import STEP_HOOKS, legacy_state_key, shadow_step_hooks
from callbacks._monitor import Monitor
from callbacks._recorder import Part, Recorder

#: hooks whose state goes through the group itself (see `on_save_checkpoint` / `on_load_checkpoint`)
_STATE_HOOKS = ("state_dict", "load_state_dict", "on_save_checkpoint", "on_load_checkpoint")
#: every hook of this Lightning's ``Callback``: the group forwards each one that some member overrides
_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value) and not name.startswith("_") and name not in _STATE_HOOKS
)


def _overrides(cb: Callback, hook: str) -> bool:
    return getattr(type(cb), hook, None) is not getattr(Callback, hook)


class CallbackGroup(Callback):
    """Dispatches Lightning's hooks to several callbacks at once, calling only the hooks each overrides.

    Behaves like passing the members to ``Trainer(callbacks=...)`` in the same order (every hook, from
    ``setup`` to the test and predict hooks), with two differences: Lightning sees one callback, and the
    monitors among the members (``ActivationMonitor``, ...) are recorded by one recorder, called at the place of
    the first of them (one reduction and one write a step for all; the monitors' own hooks are not called). Each
    member's state is saved in the checkpoint under the member's own ``state_key``, exactly as if it were passed
    alone, so checkpoints move freely between grouped and ungrouped runs.

    Args:
        callbacks: the members, called in this order.
        parts: what a subclass records beside its monitors (``HealthMonitor``'s loss and diagnoses), in the same
            recorder, after them.
        trace: the recorder records its probes' cheap numbers on every step (see ``callbacks._trace``).
        report: what collects every finding into one report (a ``callbacks._report.Report``); None: none.

    Raises:
        ValueError: when a member is not a ``Callback``.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor

        trainer = Trainer(callbacks=[CallbackGroup([ActivationMonitor(), GradientMonitor()])])
    """

    def __init__(
        self, callbacks: list[Callback], *, parts: Sequence[Part] = (), trace: bool = False, report: Any = None
    ) -> None:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ValueError(f"Expected every member to be a lightning Callback, but got {type(cb).__name__}.")
        self.callbacks = list(callbacks)
        self._state_key: str | None = None
        everything = [cb.part for cb in self.callbacks if isinstance(cb, Monitor)] + list(parts)
        #: the one recorder of the monitors among the members and of ``parts`` (None: none)
        self.recorder = (
            Recorder(everything, name=type(self).__name__, trace=trace, report=report) if everything else None
        )
        targets: list[Callback] = []
        for cb in [*self.callbacks, self.recorder]:  # the recorder at its first monitor's place (else the last)
            target = self.recorder if isinstance(cb, Monitor) else cb
            if target is not None and not any(t is target for t in targets):
                targets.append(target)
        # per hook, the bound methods of the targets that override it (bound from the class: a recorder's
        # instance may shadow its own hooks while idle)
        self._calls = {
            hook: [getattr(type(t), hook).__get__(t) for t in targets if _overrides(t, hook)] for hook in _HOOKS
        }
        # the targets whose step hooks matter: the group's step hooks sleep when all of them are idle recorders
        self._stepping = [t for t in targets if any(_overrides(t, h) for h in STEP_HOOKS)]
        self._idle = False
        # the recorder when it is the only target of `on_train_batch_start`: asked first whether a batch passes
        starts = self._calls["on_train_batch_start"]
        self._lone = self.recorder if len(starts) == 1 and starts[0].__self__ is self.recorder else None

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
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.setdefault("callbacks", {})
        for cb in self.callbacks:
            state = cb.state_dict()
            if state:
                states[cb.state_key] = state
            cb.on_save_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("callbacks", {})
        for cb in self.callbacks:
            cb.on_load_checkpoint(trainer, pl_module, checkpoint)
            state = states.get(cb.state_key) or states.get(legacy_state_key(cb))  # as Lightning itself reads it
            if state:
                cb.load_state_dict(state)

    def _batch_start(self, *args: Any) -> None:
        if self._lone is not None and self._lone.pass_batch():
            return  # asleep, still (nothing else starts a batch)
        for call in self._calls["on_train_batch_start"]:
            call(*args)
        idle = all(isinstance(t, Recorder) and t.idle for t in self._stepping)
        if idle != self._idle:
            self._idle = idle
            shadow_step_hooks(self, idle)


def _forward(hook: str) -> Any:
    def method(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        if self._idle and hook not in STEP_HOOKS:  # anything but a training step (validation, the end, an error)
            self._idle = False
            shadow_step_hooks(self, False)
        for call in self._calls[hook]:
            call(*args, **kwargs)

    def batch_start(self: CallbackGroup, *args: Any, **kwargs: Any) -> None:
        self._batch_start(*args, **kwargs)

    fn = batch_start if hook == "on_train_batch_start" else method
    fn.__name__ = hook
    fn.__doc__ = f"Calls ``{hook}`` of the members that override it."
    return fn


for _hook in _HOOKS:
    setattr(CallbackGroup, _hook, _forward(_hook))
