"""What the four monitors share: one probe and its judges (a ``Part``), their checkpoint state, and the recorder
that records them when the monitor is passed to the Trainer alone.

A monitor is not a recorder: it is a thin way to build one. Alone in ``Trainer(callbacks=...)``, it makes one
``Recorder`` of its part on its first hook and forwards Lightning's hooks to it (its step hooks sleep with it);
inside a ``CallbackGroup`` (``HealthMonitor`` is one) the group's one recorder records every member's part, and the
member's own recorder is never made. Either way exactly one recorder does the work.
"""

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks._internals import shadow_step_hooks
from callbacks._recorder import Part, Recorder
from callbacks.judges.base import Judge
from callbacks.probes.base import Probe


def check_positive(value: float, arg: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"Expected `{arg}` to be a positive number, but got {value!r}.")
    if upper is not None and value > upper:
        raise ValueError(f"Expected `{arg}` to be at most {upper}, but got {value!r}.")
    return float(value)


def check_flag(value: bool, arg: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Expected `{arg}` to be a bool, but got {value!r}.")
    return value


#: the hooks a recorder overrides: what a monitor alone forwards to its recorder
RECORDER_HOOKS = tuple(name for name, value in vars(Recorder).items() if callable(value) and name in vars(Callback))


class Monitor(Callback):
    """A callback of one probe and its judges: how a monitor of your own is made (the four monitors are ones).

    Pass it to the Trainer as any callback. The probe records on the steps its cadence says (by default every
    ``Trainer(log_every_n_steps)``), its scalars go to every logger the Trainer has, the judges read its readouts
    and their findings are warned once (``warn``), listed at the end of fit and kept in checkpoints. The work is
    done by one recorder (``callbacks._recorder``): this monitor's own (``recorder``) when it is alone, the
    group's when it is a member of a ``CallbackGroup``.

    Args:
        probe: what is watched (a :class:`callbacks.probes.base.Probe`).
        judges: what is concluded from its readouts (:class:`callbacks.judges.base.Judge`); may be empty.
        warn: warn each finding as it happens (``HealthWarning``); the findings are kept either way
            (``monitor.part.record.findings``).

    Example: the docs' "Write your own probe" page.
    """

    def __init__(self, probe: Probe, judges: list[Judge], warn: bool) -> None:
        self.warn = warn
        self.probe = probe
        #: what it brings to the recorder that records it (its own, or a group's)
        self.part = Part(type(self).__name__, [probe], judges, warn=warn)
        self._recorder: Recorder | None = None
        self._state_key: str | None = None
        self._asleep = False  # its step hooks shadowed while its recorder sleeps

    @property
    def recorder(self) -> Recorder:
        """The recorder of this monitor alone, made on first use (a monitor in a group never makes it)."""
        if self._recorder is None:
            self._recorder = Recorder([self.part], name=type(self).__name__)
        return self._recorder

    @property
    def every_n_steps(self) -> int | None:
        return self.probe.cadence.every_n_steps

    @property
    def bins(self) -> int:
        return self.probe.bins

    def _state_key_args(self) -> dict[str, Any]:
        """What tells two instances of this monitor apart in a checkpoint (see ``state_key``)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this on every hook call: compute it once (the arguments are fixed)
        if self._state_key is None:
            self._state_key = self._generate_state_key(**self._state_key_args())
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.part.state_dict(), **self.probe.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.part.load_state_dict(state_dict)
        self.probe.load_state_dict(state_dict)


def _forward(hook: str) -> Any:
    def method(self: Monitor, *args: Any, **kwargs: Any) -> None:
        recorder = self.recorder
        try:  # from the class: the recorder's instance shadows its own step hooks while asleep
            getattr(type(recorder), hook)(recorder, *args, **kwargs)
        finally:  # the monitor's step hooks sleep while its recorder's do (see `callbacks._internals`)
            if recorder.idle != self._asleep:
                self._asleep = recorder.idle
                shadow_step_hooks(self, self._asleep)

    method.__name__ = hook
    method.__doc__ = f"Calls ``{hook}`` of its recorder."
    return method


for _hook in RECORDER_HOOKS:
    setattr(Monitor, _hook, _forward(_hook))
