"""Loss spikes, with the layer that moved first: read from the every-step trace (``callbacks._trace``).

A step's loss is a spike when it is far above its recent past: a robust z-score (distance from the median of the
previous ``window`` steps, in median absolute deviations scaled to a normal's sigma) of at least ``z``. Then every
per-layer column of the trace (each parameter's gradient norm and update:data ratio, each watched module's output
RMS; the positive ones on a log scale) is compared with its own past the same way, over the ``lookback`` steps up
to the spike: the one that left its range first, by how much and how many steps before the loss, is named.
Per-layer update-norm spikes come before loss spikes and are largest in the lower layers in practitioners' runs
(marin-community/marin#1368); a corrupted batch moves every gradient with the loss, at the same step.

A step's update is made after its loss and gradients: it can only explain the loss of later steps, so an update
ratio counts from one step before the spike on (at the spike's own step it is the spike's consequence). What moved
at the spike's step and nothing before points at that step's batch; what moved before points at the training.

Calibrated in ``benchmarks/results/diagnosis_gallery.md``: the healthy runs' largest loss z over any step is 5.7 (a
GPT's per-batch loss, 1,000 steps; the MLPs at most 4.3), too close to the usual 6 sigma (a robust sigma is smaller
than a standard deviation when the tails are heavy, as a per-batch loss's are), so ``z`` is 10: the GPT's loss spikes
reach z 28 (a learning rate x30: z 7 on the first step after the jump, 28 on the next) and 60 (a batch of noise).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

from callbacks._trace import TraceRows
from callbacks.judges.base import Action, Finding, Judge, Readouts

#: a spike must also lift the loss by this much (in the loss's units, nats for a cross-entropy): a loss near 0 (an
#: easy problem learned: 0.04 on the fault zoo's blobs) has so small a spread that one harder batch (0.2) reaches
#: z 100 and recovers at once. The gallery's GPT spikes rise by 1.0 (a learning rate x30) and 2.8 (a bad batch).
MIN_RISE = 0.5
#: what each trace column is, for the message, and whether it is compared on a log scale
STATS = {"act": ("output RMS", True), "grad": ("gradient norm", True), "upd": ("update:data ratio", False)}


def robust_z(value: float, past: list[float]) -> tuple[float, float]:
    """``(z, median)``: how many robust sigmas ``value`` sits above the median of ``past`` (1.4826 MAD)."""
    median = statistics.median(past)
    mad = statistics.median(abs(v - median) for v in past) * 1.4826
    mad = max(mad, 1e-3 * abs(median), 1e-12)  # a flat past: a small floor, not a division by zero
    return (value - median) / mad, median


class LossSpikes(Judge):
    """Finds loss spikes in the trace and names the layer whose statistic left its own range first."""

    reads = (TraceRows,)

    def __init__(
        self, z: float = 10.0, window: int = 100, lookback: int = 10, cooldown: int = 50, min_rise: float = MIN_RISE
    ) -> None:
        super().__init__()
        self.z, self.window, self.lookback, self.cooldown = z, window, lookback, cooldown
        self.min_rise = min_rise
        self.reset()

    def reset(self) -> None:
        self.history: dict[str, deque[float]] = {}
        self.steps: deque[int] = deque(maxlen=self.window + self.lookback + 1)
        self.quiet_until = -1  # after a spike, its aftermath is not another one

    def state_dict(self) -> dict[str, Any]:
        history = {c: list(v) for c, v in self.history.items()}
        return {"history": history, "steps": list(self.steps), "quiet_until": self.quiet_until}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keep = self.window + self.lookback + 1
        self.history = {c: deque(v, maxlen=keep) for c, v in state.get("history", {}).items()}
        self.steps = deque(state.get("steps", []), maxlen=keep)
        self.quiet_until = int(state.get("quiet_until", -1))

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        trace = readouts[TraceRows]
        found = []
        keep = self.window + self.lookback + 1
        for s, row in zip(trace.steps, trace.rows, strict=True):
            for column, value in zip(trace.columns, row, strict=True):
                series = self.history.setdefault(column, deque(maxlen=keep))
                series.append(self._scale(column, value))
            self.steps.append(s)
            finding = self._spike(s)
            if finding is not None:
                found.append(finding)
        return found

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        return self.observe(step, readouts)  # the rows since the last recorded step

    @staticmethod
    def _scale(column: str, value: float) -> float:
        kind = column.split("/", 1)[0]
        if STATS.get(kind, ("", False))[1]:
            return math.log10(value) if value > 0 else math.nan
        return value

    def _spike(self, step: int) -> Finding | None:
        loss = self.history.get("loss")
        if loss is None or len(loss) <= self.window or step < self.quiet_until:
            return None
        past = [v for v in list(loss)[-self.window - 1 : -1] if math.isfinite(v)]
        if len(past) < self.window // 2 or not math.isfinite(loss[-1]):
            return None
        z, typical = robust_z(loss[-1], past)
        if z < self.z or loss[-1] - typical < self.min_rise:
            return None
        self.quiet_until = step + self.cooldown
        first = self._first_to_move()
        message = f"The loss spiked at step {step}: {loss[-1]:.3g} against a typical {typical:.3g} (robust z {z:.0f})."
        if first is None:
            fix = "No layer's statistics moved before it: look at the batch of that step (a corrupted or unusual one)."
            action = Action("clip_gradients", (), 1.0, f"loss robust z {z:.0f}, nothing moved before")
            return Finding(f"spike/{step}", step, "", message, fix, "loss", action=action)
        column, lag, zc, value, normal = first
        kind, name = column.split("/", 1)
        what, log = STATS[kind]
        shown = (lambda v: f"{10**v:.3g}") if log else (lambda v: f"{v:.2f}")
        when = f"{lag} step{'s' if lag != 1 else ''} before the loss" if lag else "at the same step as the loss"
        message += (
            f" First to leave its own range: the {what} of `{name}`, {when} ({shown(value)} against a typical"
            f" {shown(normal)}, robust z {zc:.0f})."
        )
        if not lag:
            fix = (
                f"Nothing moved before the loss: the {what} jumped with it, at the same step. A bad batch: look at the"
                " data of that step, and clip the gradients (gradient_clip_val) so one batch cannot undo training."
            )
        elif kind == "upd":
            fix = (
                "Its updates jumped before the loss did: the learning rate is too high for it at this point (a jump"
                " or a warm-up too short): lower or warm up the learning rate, or clip the gradients."
            )
        elif kind == "act":
            fix = (
                "Its outputs grew before the loss: an instability in this layer (outlier features); check its"
                " normalisation and lower the learning rate."
            )
        else:
            fix = (
                "Its gradients grew before the loss: an instability building up in this layer; lower the learning"
                " rate or clip the gradients."
            )
        # a bad batch: clip so one batch cannot undo training; an instability building up: a lower learning rate
        action = (
            Action("clip_gradients", (), 1.0, f"loss robust z {z:.0f}, {what} moved with it")
            if not lag
            else Action("scale_lr", (), 0.3, f"loss robust z {z:.0f}, {what} of {name} {lag} steps before")
        )
        figure = "update_ratio/history" if kind == "upd" else "loss"
        return Finding(f"spike/{step}", step, name, message, fix, figure, action=action)

    def _first_to_move(self) -> tuple[str, int, float, float, float] | None:
        """``(column, steps before the loss, z, value, typical)`` of the column that left its range first."""
        best = None
        for column, series in self.history.items():
            if column == "loss" or len(series) <= self.window:
                continue
            values = list(series)
            base = [v for v in values[: -self.lookback - 1][-self.window :] if math.isfinite(v)]
            if len(base) < self.window // 2:
                continue
            last = 1 if column.startswith("upd/") else 0  # a step's update comes after its loss
            for lag in range(self.lookback, last - 1, -1):  # the earliest step first
                value = values[-1 - lag]
                if not math.isfinite(value):
                    continue
                z, typical = robust_z(value, base)
                if z >= self.z:
                    candidate = (column, lag, z, value, typical)
                    if best is None or lag > best[1] or (lag == best[1] and z > best[2]):
                        best = candidate
                    break
        return best
