"""What a judge is: it reads the probes' readouts (plain numbers per layer) and returns findings.

A judge never touches a tensor, a hook, a logger or the trainer, so it is tested with hand-made readouts in
microseconds. The recorder gives every judge the readouts of each recorded step (``observe``) and, at the end of
fit, the last ones (``conclude``); a finding is warned about once (``HealthWarning``), listed in the monitor's
end-of-fit summary and, with a ``HealthMonitor``, in the health report.

A judge names what it reads by the readouts' classes (``reads = (Activations,)``) and gets each typed:
``readouts[Activations]`` is an ``Activations`` (a type checker knows it), ``readouts.get(OutputLogits)`` one or None.
A readout class names its probe with ``prefix: ClassVar[str]``, the probe's own ``prefix``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

R = TypeVar("R")

#: what a judge reads: a readout class (``Activations``: typed) or its probe's prefix (``"activation"``: untyped)
Read = type | str


def prefix_of(read: Read) -> str:
    """The probe prefix ``read`` stands for: a readout class's ``prefix`` class attribute, or the string itself.

    Raises:
        TypeError: a class without a ``prefix`` (it cannot be told which probe's readout it is).
    """
    if isinstance(read, str):
        return read
    prefix = getattr(read, "prefix", None)
    if not isinstance(prefix, str) or not prefix:
        raise TypeError(
            f"Expected a readout class with its probe's prefix, but `{read.__qualname__}` has no `prefix`: declare"
            " `prefix: ClassVar[str]` in it, equal to its probe's `prefix`."
        )
    return prefix


class Readouts(Mapping[str, Any]):
    """The readouts of one recorded step: each probe's, by its class (typed) or by its probe's prefix.

    ``readouts[Activations]`` is the activation probe's readout, an ``Activations`` to a type checker and at run
    time (anything else raises); ``readouts.get(OutputLogits)`` is the logits probe's or None (absent, or a probe
    that had nothing to read). It is still a ``Mapping[str, Any]`` by prefix (``readouts["activation"]``).

    Example::

        readouts = Readouts.of(Loss(step=0, value=3.3, classes=27, source="given"))
        readouts[Loss].value  # 3.3, typed
    """

    def __init__(self, by_prefix: Mapping[str, Any] | None = None) -> None:
        self._by_prefix = dict(by_prefix or {})

    @classmethod
    def of(cls, *readouts: object) -> Readouts:
        """Readouts made by hand (a judge's test): each keyed by its class's ``prefix``."""
        return cls({prefix_of(type(r)): r for r in readouts})

    @overload
    def __getitem__(self, key: type[R]) -> R: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: type[R] | str) -> Any:
        prefix = prefix_of(key)
        if prefix not in self._by_prefix:
            raise KeyError(f"no `{prefix}` readout on this step: name it in the judge's `reads` (asked only with it)")
        value = self._by_prefix[prefix]
        if not isinstance(key, str) and not isinstance(value, key):
            raise TypeError(
                f"Expected the `{prefix}` readout to be a {key.__qualname__}, but got {type(value).__qualname__}: "
                + (
                    f"its probe had nothing to read; use `readouts.get({key.__qualname__})`."
                    if value is None
                    else f"`{key.__qualname__}.prefix` must be the prefix of the probe whose `read` returns it."
                )
            )
        return value

    @overload  # type: ignore[override]
    def get(self, key: type[R], default: None = None) -> R | None: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: type[R] | str, default: Any = None) -> Any:
        """The readout of ``key`` (a class: typed), or ``default`` when there is none (or its probe read nothing)."""
        if key not in self or self._by_prefix[prefix_of(key)] is None:
            return default
        return self[key]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, type)) and prefix_of(key) in self._by_prefix

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_prefix)

    def __len__(self) -> int:
        return len(self._by_prefix)

    def __repr__(self) -> str:
        return f"Readouts({self._by_prefix!r})"


#: what an :class:`Action` can change: the learning rate (of the model or named parameters) by ``value``, a named
#: layer's weights (scaled by ``value``, or re-initialised with its activation's gain: ``init``), normalisation
#: switched on, the activation swapped for ``value``, gradients clipped at norm ``value``, the logits (not
#: probabilities) given to the loss named in ``targets`` (a change to the model's code: no program applies it), the
#: examples per optimizer step raised to ``value`` (the data loader's batch size), the training labels cleaned (an edit
#: of the data: the examples the trained model fits worse than a uniform guess fixed or dropped), the training labels
#: fixed where they come from (an edit of the data pipeline: they disagree with the validation labels), the inputs
#: standardised (an edit of the data: each feature's training mean subtracted, divided by its std), frozen modules
#: unfrozen
ActionKind = Literal[
    "scale_lr",
    "scale_layer",
    "init",
    "normalise",
    "activation",
    "clip_gradients",
    "loss_logits",
    "batch_size",
    "clean_labels",
    "label_source",
    "normalise_inputs",
    "unfreeze",
]


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
        if self.kind == "loss_logits":
            return f"logits to {where or 'the loss'} (no softmax before it)"
        if self.kind == "batch_size":
            return f"batch size {self.value}"
        if self.kind == "unfreeze":
            return f"unfreeze {where}"
        if self.kind == "normalise_inputs":
            return "standardise the inputs"
        if self.kind == "clean_labels":
            return "clean the labels (fix or drop the mislabelled examples)"
        if self.kind == "label_source":
            return "fix the training labels at their source (validation's are right)"
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

    #: the readouts it needs, by class (``(Activations, Gradients)``) or by probe prefix (``("activation",)``): it is
    #: asked only when all of them are there
    reads: tuple[Read, ...] = ()

    def __init__(self) -> None:
        self.record = Record()

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The probe prefixes of :attr:`reads` (what the recorder looks for; worked out again only when ``reads`` is
        replaced: the recorder asks on every recorded step)."""
        cached = self.__dict__.get("_prefixes")
        if cached is None or cached[0] is not self.reads:
            cached = self.__dict__["_prefixes"] = (self.reads, tuple(prefix_of(r) for r in self.reads))
        return cached[1]

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
