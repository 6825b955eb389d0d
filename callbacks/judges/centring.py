"""A hidden activation that is not zero-centred: a sigmoid (or hard sigmoid) between layers.

The lecture's tanh is zero-centred; a sigmoid is tanh squeezed into ``(0, 1)``: ``sigmoid(x) = (1 + tanh(x / 2)) / 2``.
As a hidden activation that costs twice. Its outputs are all positive, around 0.5, so every weight of the next
layer gets gradients of the same sign for a sample (``dL/dW = dL/dy · h``, and ``h > 0``): the weights can only
move together and zig-zag toward their targets. And its slope is at most 1/4 (tanh's is 1), so each sigmoid layer
shrinks the gradient by 4 or more on its way back. Read from the activation probe (no tensor here): a bounded
activation whose outputs are never negative and whose mean is at least :data:`MIN_MEAN`, on ``patience``
consecutive recorded steps. The fix swaps it for tanh (the model is rebuilt: ``Action("activation", ..., "tanh")``).

Left out: a sigmoid used as a gate (an LSTM's, a squeeze-excitation block's), whose output multiplies another tensor
instead of feeding a layer, is fine; the activation probe cannot tell the two apart, so the finding says so.
"""

from __future__ import annotations

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.activation import Activations

#: the least mean output that is "not zero-centred" for a bounded activation in [0, 1] (a sigmoid's is about 0.5)
MIN_MEAN = 0.25


class NotZeroCentred(Judge):
    """A bounded activation whose outputs are all >= 0 with a mean >= :data:`MIN_MEAN` (a sigmoid between layers)."""

    reads = (Activations,)

    def __init__(self, patience: int = 3) -> None:
        super().__init__()
        self.patience = patience

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        found = []
        for layer in readouts[Activations].layers:
            s = layer.summary
            key = f"centring/{layer.name}"
            holds = layer.kind == "bounded" and s.count > 0 and s.min >= 0 and s.mean >= MIN_MEAN
            if self.record.streak(key, holds) != self.patience:
                continue
            message = (
                f"`{layer.label}` is not zero-centred: its outputs are all >= 0 with mean {s.mean:.2f}, so the next"
                " layer's weights get gradients of one sign per sample and zig-zag, and its slope (at most 1/4 for a"
                " sigmoid) shrinks the gradient at least 4× on the way back."
            )
            fix = (
                "Use tanh (zero-centred, slope 1 at 0; init gain 5/3) or a ReLU-like activation between layers. If it"
                " is a gate (its output multiplies another tensor: LSTM, squeeze-excitation), this does not apply."
            )
            action = Action("activation", (layer.name,), "tanh", f"all outputs >= 0, mean {s.mean:.2f}")
            found.append(Finding(key, step, layer.label, message, fix, "activation/distribution", action=action))
        return found
