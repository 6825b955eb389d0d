"""What the four monitors share: a recorder of one probe and its judges, with their checkpoint state."""

from typing import Any

from typing_extensions import override

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


class Monitor(Recorder):
    """A callback of one probe and its judges: how a monitor of your own is made (the four monitors are ones).

    Pass it to the Trainer as any callback. The probe records on the steps its cadence says (by default every
    ``Trainer(log_every_n_steps)``), its scalars go to every logger the Trainer has, the judges read its readouts
    and their findings are warned once (``warn``), listed at the end of fit and kept in checkpoints.

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
        self.part = Part(type(self).__name__, [probe], judges, warn=warn)
        super().__init__([self.part])

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
