"""A classification loss given the wrong thing: probabilities to ``cross_entropy``, anything but log-probabilities to
``nll_loss`` (read from :class:`callbacks.probes.loss_input.LossInputProbe`).

Both are bugs in the code, not in the numbers: each is said once, as soon as a checked step shows it on every input
row, with the fix to make in the code (``cross_entropy``'s also as a ``loss_logits`` action, which no program applies:
it is an edit of the model's code).
"""

from __future__ import annotations

import math

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.loss_input import LossInputs


def softmax_floor(classes: int) -> float:
    """The lowest cross-entropy of ``softmax(p)`` over ``classes`` classes when ``p`` are probabilities: reached at
    a one-hot ``p`` on the target, ``-log(e / (e + C - 1)) = ln(e + C - 1) - 1``."""
    return math.log(math.e + classes - 1) - 1


class LossInputCheck(Judge):
    """Says when ``cross_entropy`` gets probabilities, or ``nll_loss`` anything but log-probabilities."""

    reads = (LossInputs,)

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        r = readouts[LossInputs]
        if not r.checked:
            return []
        findings = []
        c = r.classes
        if r.cross_entropy_rows and r.cross_entropy_probability_rows == r.cross_entropy_rows:
            findings.append(
                Finding(
                    "loss_input/cross_entropy",
                    step,
                    "cross_entropy",
                    f"`cross_entropy` is given probabilities, not logits: each of its {r.cross_entropy_rows} input "
                    "rows is >= 0 and sums to 1 (a softmax before the loss). It applies log-softmax itself, so it "
                    f"sees softmax(softmax(z)): with {c} classes the loss cannot go below {softmax_floor(c):.2f} "
                    "(a perfect model's is 0) and its gradient is squashed.",
                    "Pass the logits to the loss: remove the softmax before it (keep it for sampling and predictions).",
                    action=Action("loss_logits", ("cross_entropy",), None, "every input row sums to 1"),
                )
            )
        if r.nll_rows and r.nll_probability_rows == r.nll_rows:
            findings.append(
                Finding(
                    "loss_input/nll_loss",
                    step,
                    "nll_loss",
                    f"`nll_loss` is given probabilities: each of its {r.nll_rows} input rows is >= 0 and sums to 1. It "
                    "expects log-probabilities and returns -x[target], so here the loss is -p (between -1 and 0) "
                    "and its gradient does not grow as the model gets worse.",
                    "Apply `log_softmax` to the logits before `nll_loss` (not `softmax`), or give the logits to "
                    "`cross_entropy`.",
                )
            )
        elif r.nll_rows and r.nll_not_log_rows == r.nll_rows:
            findings.append(
                Finding(
                    "loss_input/nll_loss",
                    step,
                    "nll_loss",
                    f"`nll_loss` is given values that are not log-probabilities: over the classes their logsumexp is "
                    f"{r.nll_mean_logsumexp:.2f} on average, not 0. It returns -x[target], which the model can push "
                    "toward -inf without learning anything.",
                    "Apply `log_softmax` to the logits before `nll_loss`, or give the logits to `cross_entropy`.",
                )
            )
        return findings
