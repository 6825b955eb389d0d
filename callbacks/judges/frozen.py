"""A layer frozen in a model trained from scratch (read from :class:`callbacks.probes.frozen.FrozenProbe`).

A model trained from scratch starts as a uniform guesser: its loss at step 0 is near ``ln(C)``. A hidden layer with
``requires_grad=False`` there keeps its random init for the whole fit: the rest of the network must work around a
fixed random projection (the fault studies' "layer frozen by mistake"). That is a **problem**, with an ``unfreeze``
action (``callbacks.fixes``). A pretrained model being fine-tuned starts far below ``ln(C)``
(:func:`callbacks.judges.lr.fresh`): its frozen layers are most likely frozen on purpose, a **note**. Without a
loss or a class count, a note as well.
"""

from __future__ import annotations

import math

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.judges.lr import fresh
from callbacks.probes.frozen import FrozenModules
from callbacks.probes.loss import Loss


class FrozenLayers(Judge):
    """Says which layers with weights are frozen, and whether that looks like a mistake."""

    reads = (FrozenModules,)  # and the loss of the same step, when its probe recorded it

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        r = readouts[FrozenModules]
        loss = readouts.get(Loss)
        uniform = math.log(loss.classes) if loss is not None and loss.classes else math.nan
        value = loss.value if loss is not None else math.nan
        names = ", ".join(f"`{m}`" for m in r.modules)
        if step == 0 and fresh(value, uniform):
            message = (
                f"{names} {'is' if len(r.modules) == 1 else 'are'} frozen (requires_grad=False) in a model trained from"
                f" scratch (its loss at step 0, {value:.2f}, is a uniform guess's, ln C = {uniform:.2f}): "
                f"{'its' if len(r.modules) == 1 else 'their'} random init stays for the whole fit."
            )
            fix = "Unfreeze it (requires_grad=True, and in the optimizer's parameter groups), unless it is on purpose."
            action = Action("unfreeze", tuple(r.modules), None, "frozen at a fresh init")
            return [Finding("frozen/layers", step, r.modules[0], message, fix, "", action=action)]
        message = f"{names} {'is' if len(r.modules) == 1 else 'are'} frozen (requires_grad=False)."
        fix = "Fine when it is on purpose (a pretrained part kept fixed); the rest of the model trains."
        return [Finding("frozen/layers", step, r.modules[0], message, fix, "", "note")]
