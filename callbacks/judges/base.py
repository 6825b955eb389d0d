"""What a judge is: it reads the probes' readouts (plain numbers per layer) and returns findings.

A judge never touches a tensor, a hook, a logger or the trainer, so it is tested with hand-made readouts in
microseconds. The recorder gives every judge the readouts of each recorded step (``observe``) and, at the end of
fit, the last ones (``conclude``); a finding is warned about once (``HealthWarning``), listed in the monitor's
end-of-fit summary and, with a ``HealthMonitor``, in the health report.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

#: readouts of one recorded step by probe prefix, e.g. ``readouts["activation"]`` (an ``Activations``)
Readouts = Mapping[str, Any]


#: what an :class:`Action` can change: the learning rate (of the model or named parameters) by ``value``, a named
#: layer's weights (scaled by ``value``, or re-initialised with its activation's gain: ``init``), normalisation
#: switched on, the activation swapped for ``value``, gradients clipped at norm ``value``
ActionKind = Literal["scale_lr", "scale_layer", "init", "normalise", "activation", "clip_gradients"]


@dataclass(frozen=True)
class Action:
    """A fix a program can apply (``callbacks.fixes``; ``train.py`` flags), beside a finding's sentence.

    ``targets``: parameter or module names (empty: the whole model); for ``init``, the activations whose feeding
    layers are re-initialised (``std = gain / sqrt(fan_in)``); ``value``: the factor (``scale_lr``,
    ``scale_layer``), the init regime or activation name, or the gradient norm to clip at; ``evidence``: the
    numbers behind it, in a few words.
    """

    kind: ActionKind
    targets: tuple[str, ...] = ()
    value: float | str | None = None
    evidence: str = ""

    def describe(self) -> str:
        """One short phrase: ``"lr × 0.1"``, ``"scale net.head × 0.01"``."""
        where = ", ".join(self.targets)
        if self.kind == "scale_lr":
            return f"lr × {self.value:.3g}" + (f" for {where}" if where else "")  # type: ignore[str-format]
        if self.kind == "scale_layer":
            return f"scale {where} × {self.value:.3g}"  # type: ignore[str-format]
        if self.kind == "clip_gradients":
            return f"clip gradients at norm {self.value:.3g}"  # type: ignore[str-format]
        if self.kind == "init":
            return f"init {self.value}" + (f" before {where}" if where else "")
        if self.kind == "activation":
            return f"activation {self.value}"
        return "normalise (BatchNorm)" + (f" before {where}" if where else "")


@dataclass(frozen=True)
class Finding:
    """One thing a judge found: what, where, how much (``message``), since when (``step``) and what to change.

    ``key`` identifies it for "warned once" (and the checkpoint); ``figure`` is the figure or chart to look at.
    """

    key: str
    step: int
    where: str  # the layer or parameter ("" for the whole model)
    message: str
    fix: str = ""
    figure: str = ""
    severity: Literal["problem", "note"] = "problem"
    action: Action | None = None  # the fix as something a program can apply (None: none applicable)

    @property
    def text(self) -> str:
        return f"{self.message} {self.fix}".strip()


class Record:
    """What one monitor's judges remember across steps and checkpoints: the findings warned, and streaks."""

    def __init__(self) -> None:
        self.warned: dict[str, str] = {}  # key -> the finding's text
        self.streaks: dict[str, int] = {}  # key -> consecutive recorded steps on which it held
        self.findings: list[Finding] = []  # this fit's findings, in the order found (for the report)

    def reset(self) -> None:
        self.warned, self.streaks, self.findings = {}, {}, []

    def streak(self, key: str, holds: bool) -> int:
        """Counts the consecutive recorded steps on which ``holds`` was True for ``key`` (0 when it did not)."""
        if not holds:
            self.streaks.pop(key, None)
            return 0
        self.streaks[key] = self.streaks.get(key, 0) + 1
        return self.streaks[key]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs to end with the same report: the warned keys, the streaks and the findings (plain
        Python values: a checkpoint loads them with ``weights_only``)."""
        findings = [_finding_state(f) for f in self.findings]
        return {"warned": dict(self.warned), "streaks": dict(self.streaks), "findings": findings}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warned = dict(state.get("warned", {}))
        self.streaks = dict(state.get("streaks", {}))
        self.findings = [_finding_from_state(f) for f in state.get("findings", [])]  # (none before they were kept)


def _finding_state(f: Finding) -> dict[str, Any]:
    state = {k: getattr(f, k) for k in ("key", "step", "where", "message", "fix", "figure", "severity")}
    if f.action is not None:
        a = f.action
        state["action"] = {"kind": a.kind, "targets": list(a.targets), "value": a.value, "evidence": a.evidence}
    return state


def _finding_from_state(state: Mapping[str, Any]) -> Finding:
    action = state.get("action")
    if action is not None:
        action = Action(action["kind"], tuple(action["targets"]), action["value"], action["evidence"])
    return Finding(**{k: v for k, v in state.items() if k != "action"}, action=action)


class Judge:
    """Base class: reads readouts, returns findings. ``record`` is its monitor's (streaks live there)."""

    #: the probe prefixes whose readouts it needs (it is asked only when all of them are there)
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.record = Record()

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        """Findings on a recorded step (``readouts`` of the probes that recorded it)."""
        return []

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        """Findings at the end of fit (``readouts``: each probe's last)."""
        return []

    def reset(self) -> None:
        """Forgets a previous fit (its record is reset by its monitor)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
