"""What the data does to training: too few examples per optimizer step (:class:`SmallBatch`) and wrong labels
(:class:`NoisyLabels`), read from :class:`callbacks.probes.loss_input.LossInputProbe`, and inputs left unnormalised
(:class:`UnnormalisedInputs`), from :class:`callbacks.probes.inputs.InputProbe`.

**Too few examples per step.**

Each step's gradient is the mean of its examples' gradients, so its noise falls as ``1 / sqrt(N)`` with ``N``
examples per step; with a handful, the step is mostly noise, and a fit of a fixed number of steps sees a small part
of the data. BatchNorm suffers twice: its batch statistics come from those few examples (Wu & He, "Group
Normalization", 2018: BatchNorm's error rises steeply below 16 examples per batch). ``N`` is what the loss is
averaged over: the rows given to ``cross_entropy`` or ``nll_loss`` in a checked step (samples x positions, summed over
the ranks), times the Trainer's ``accumulate_grad_batches``. Below :data:`MIN_EXAMPLES` it is a problem, with a
``batch_size`` action (``train.py``'s ``--data.batch_size``; any other program changes its data loader, or
accumulates gradients).

**Wrong labels.** A network learns the examples that agree with each other first (the "early learning" of
Arpit et al., 2017, and Liu et al., 2020), so late in a fit a dataset with wrong labels shows two groups: most
examples fit well, and a minority fit worse than a uniform guess would, because the model contradicts their label.
A clean task leaves few such examples; a task that is uncertain by nature (the next character of a name) has no
well-fit majority. In the last fifth of the fit (``LATE``) the probe reads the rows' own losses: when over half are
below ``ln(C) / 2`` and at least :data:`NOISY` of them above ``ln(C)``, it is a problem, with a ``clean_labels``
action (an edit of the data: find the mislabelled examples, e.g. cleanlab's ``find_label_issues`` with out-of-sample
probabilities, and fix or drop them). Measured on the fault zoo's bases (benchmarks/results/fault_zoo.md): clean
blobs and digits 0.2 % worse than uniform, with 40 % of the labels shuffled 30-31 %; the names (no well-fit
majority: a median loss of 0.67 ln C) are left alone by that rule.

Where the module logs a validation loss (:mod:`callbacks.probes.validation`), wrong training labels show another way,
also in a task uncertain by nature: the training examples are harder to fit than the validation ones, so the
training loss of the last fifth's rows stays above the validation loss at the end, by at least :data:`GAP` nats and
:data:`GAP_SE` standard errors of their mean, while below a uniform guess's (a fit that blew up is the learning
rate's); clean fits sit at or below it (the same data, and a model that fits what it trains on). A model with an
active dropout is left out (its training loss is higher by design); training-only augmentation does the same, which
the message names. Measured on the fault zoo: clean fits and the other mutants -0.05 to +0.10 nats, the names with
40 % of their labels shuffled +0.15 to +0.20. Its action is ``label_source``: the split's labels are damaged where
they come from (the validation labels are right), so the fix is there, not in which examples to drop. It is checked
first; the examples' rule answers where it does not (no validation loss logged, or no gap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from callbacks.judges.base import Action, Finding, Judge, Readouts
from callbacks.probes.inputs import Inputs
from callbacks.probes.loss_input import LossInputs
from callbacks.probes.validation import Validation

#: fewer loss rows than this per optimizer step is a problem (a language model's rows are its tokens: thousands)
MIN_EXAMPLES = 8
#: the batch the action asks for: the lecture's
BATCH = 32
#: wrong labels: at least this share of the late rows fit worse than a uniform guess, while over half fit well
NOISY = 0.15
#: late rows needed before judging
MIN_ROWS = 200
#: wrong labels, from the validation loss: the late training rows' mean loss above it by this many nats at least, and
#: by this many standard errors of that mean
GAP, GAP_SE = 0.12, 2.5
#: the first layer's inputs are "unnormalised" when their root mean square is above this (standardised: 1; images in
#: [0, 1]: ~0.5; raw pixels in [0, 255]: ~100; the fault zoo's operator, x * 50 + 20: 54)
MAX_INPUT_RMS = 10.0


class SmallBatch(Judge):
    """Says when an optimizer step averages the loss over fewer than :data:`MIN_EXAMPLES` examples."""

    reads = (LossInputs,)

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        r = readouts[LossInputs]
        rows = r.cross_entropy_rows + r.nll_rows
        if not r.checked or rows == 0:
            return []
        examples = rows * max(r.micro_batches, 1)
        if examples >= MIN_EXAMPLES:
            return []
        per = f"{rows} per micro-batch x {r.micro_batches} micro-batches" if r.micro_batches > 1 else "one batch"
        message = (
            f"Each optimizer step averages the loss over only {examples} examples ({per}, all ranks): its gradient's"
            f" noise is 1/sqrt({examples}) of one example's, so the steps are mostly noise, and a fit of a fixed"
            " number of steps sees little of the data (BatchNorm's statistics from so few are noise as well)."
        )
        fix = (
            f"Use batches of {BATCH} (the lecture's), or accumulate gradients"
            " (`Trainer(accumulate_grad_batches=...)`) to reach it."
        )
        action = Action("batch_size", (), BATCH, f"{examples} examples per step")
        return [Finding("batch/size", step, "", message, fix, "loss", action=action)]


class NoisyLabels(Judge):
    """At the end of fit: a well-fit majority and a minority fit worse than a uniform guess (wrong labels)."""

    reads = (LossInputs,)

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.rows = self.good = self.bad = 0  # summed over the late recorded steps
        self.loss_sum = self.loss_squares = 0.0  # the late rows' losses, and their squares
        self.dropout = False
        self.classes = 0  # C of the late rows (the largest seen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "good": self.good,
            "bad": self.bad,
            "loss_sum": self.loss_sum,
            "loss_squares": self.loss_squares,
            "dropout": self.dropout,
            "classes": self.classes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows, self.good, self.bad = (int(state.get(k, 0)) for k in ("rows", "good", "bad"))
        self.loss_sum, self.loss_squares = (float(state.get(k, 0.0)) for k in ("loss_sum", "loss_squares"))
        self.dropout = bool(state.get("dropout", False))
        self.classes = int(state.get("classes", 0))

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        r = readouts[LossInputs]
        self.rows += r.late_rows
        self.good += r.late_good_rows
        self.bad += r.late_bad_rows
        self.loss_sum += r.late_loss_sum
        self.loss_squares += r.late_loss_squares
        self.dropout = self.dropout or r.dropout
        self.classes = max(self.classes, r.classes)
        return []

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        if self.rows < MIN_ROWS:
            return []
        above = self._above_validation(step, readouts.get(Validation))
        if above:
            return above  # the training labels worse than validation's: where they come from, not which examples
        good, bad = self.good / self.rows, self.bad / self.rows
        if good <= 0.5 or bad < NOISY:
            return []
        message = (
            f"In the last fifth of the fit the model fits {good:.0%} of the training rows it was given well (a loss"
            f" below half of ln C) but {bad:.0%} worse than a uniform guess (above ln C), of {self.rows} read: a"
            " minority it contradicts, the signature of wrong labels (clean tasks: under 1 %)."
        )
        fix = (
            "Look at the examples the trained model fits worse than a uniform guess: find the mislabelled ones"
            " (cleanlab's `find_label_issues`, with out-of-sample probabilities) and fix or drop them, or train with a"
            " loss robust to label noise."
        )
        action = Action("clean_labels", (), None, f"{bad:.0%} of rows worse than uniform, {good:.0%} fit well")
        return [Finding("data/labels", step, "", message, fix, "loss", action=action)]

    def _above_validation(self, step: int, validation: Validation | None) -> list[Finding]:
        """The second rule (the module docstring): the late training rows fit worse than the validation set."""
        if validation is None or self.dropout:
            return []
        mean = self.loss_sum / self.rows
        se = math.sqrt(max(self.loss_squares / self.rows - mean**2, 0.0) / self.rows)
        gap = mean - validation.value
        if not mean < math.log(max(self.classes, 2)) or gap < max(GAP, GAP_SE * se):
            # (a training loss above a uniform guess's: a fit that blew up, which the learning-rate advice names)
            return []
        message = (
            f"In the last fifth of the fit the training rows' loss is {mean:.3f} (± {se:.3f}, {self.rows} rows), above"
            f" the validation loss at step {validation.step}, {validation.value:.3f} (`{validation.key}`), by"
            f" {gap:.3f} nats: the model fits the examples it trains on worse than ones it never saw. The training"
            " labels are wrong where the validation labels are not (or training alone is augmented or regularised)."
        )
        fix = (
            "Fix the training labels where they come from: compare how the training split's labels are read, mapped"
            " and paired with their inputs with how the validation split's are (a shuffle of one without the other, an"
            " off-by-one, another class mapping, a noisier annotation). A task uncertain by nature has no examples"
            " to drop: its model contradicts the right labels too."
        )
        action = Action("label_source", (), None, f"train {mean:.3f} vs val {validation.value:.3f}")
        return [Finding("data/labels", step, "", message, fix, "loss", action=action)]


class UnnormalisedInputs(Judge):
    """Says when the model's first weighted layer gets inputs far from unit scale (RMS above :data:`MAX_INPUT_RMS`)."""

    reads = (Inputs,)

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        r = readouts[Inputs]
        if not r.rms > MAX_INPUT_RMS:
            return []
        std = math.sqrt(max(r.rms**2 - r.mean**2, 0.0))
        message = (
            f"The model's first layer, `{r.layer}`, is given inputs of mean {r.mean:.3g} and std {std:.3g} (root mean"
            f" square {r.rms:.3g}): an init scaled for unit inputs (Kaiming assumes them) makes its pre-activations"
            f" ~{r.rms:.0f}x too large, saturating what follows, and scales its gradients by as much."
        )
        fix = (
            "Standardise the inputs: subtract the training set's mean and divide by its std, per feature (in the data"
            " module or a transform), and apply the same to validation and test."
        )
        action = Action("normalise_inputs", (r.layer.split(" ")[0],), None, f"input rms {r.rms:.3g}")
        return [Finding("data/inputs", step, r.layer, message, fix, "activation/distribution", action=action)]
