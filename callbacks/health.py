"""``HealthMonitor``: the four monitors, the loss, the lecture's diagnoses and one health report, in one callback."""

from typing import Any

from typing_extensions import override

from callbacks._cadence import Cadence
from callbacks._recorder import Part
from callbacks._report import Report
from callbacks.activation import ActivationMonitor, GradientMonitor
from callbacks.group import CallbackGroup
from callbacks.judges.centring import NotZeroCentred
from callbacks.judges.data import NoisyLabels, SmallBatch, UnnormalisedInputs
from callbacks.judges.frozen import FrozenLayers
from callbacks.judges.init import InitCheck
from callbacks.judges.loss_input import LossInputCheck
from callbacks.judges.lr import LearningRateAdvice
from callbacks.judges.outliers import OutlierActivations
from callbacks.judges.spikes import LossSpikes
from callbacks.judges.transformer import (
    AttentionEntropyCollapse,
    AttentionLogitGrowth,
    EpsDominatedUpdates,
    OutputLogitDivergence,
)
from callbacks.parameter import ParameterMonitor, UpdateRatioMonitor
from callbacks.probes.adam import AdamEpsProbe
from callbacks.probes.attention import AttentionProbe
from callbacks.probes.frozen import FrozenProbe
from callbacks.probes.inputs import InputProbe
from callbacks.probes.logits import OutputLogitsProbe
from callbacks.probes.loss import LossProbe
from callbacks.probes.loss_input import LossInputProbe
from callbacks.probes.validation import ValidationProbe

#: HealthMonitor's own parts (beside the four monitors'), by attribute and checkpoint key
PARTS = ("diagnoses", "transformer", "loss_input")


class HealthMonitor(CallbackGroup):
    r"""Watches a fit as the lecture would and says what is wrong, in which layer, and what to change.

    The four monitors (:class:`ActivationMonitor`, :class:`GradientMonitor`, :class:`ParameterMonitor`,
    :class:`UpdateRatioMonitor`, with their tags, figures and warnings) as one recorder, plus the loss and these
    diagnoses, each finding with its step, layer, numbers and fix:

    - **the check at initialisation** (step 0, before the first update): the loss against ``ln(C)`` (a uniform
      guess), saturated activations, activations and gradients shrinking or growing with depth, parameters whose
      grad:data ratio is far from the others', biases right before a batch normalisation. Printed as one block
      when training starts;
    - **learning-rate advice per layer** at the end of fit, from the update:data history (about 1e-3 is healthy);
    - **loss spikes** with the layer that moved first, from a few cheap numbers recorded on *every* step
      (``trace``): each parameter's gradient norm and update:data ratio, each watched module's output RMS;
    - **outlier activations**: a module whose largest output is orders of magnitude above its RMS;
    - **a hidden activation that is not zero-centred** (a sigmoid between layers): -> tanh;
    - **the loss's input**, on the first recorded steps: probabilities given to ``cross_entropy`` (a softmax before
      it), anything but log-probabilities given to ``nll_loss``;
    - **Transformer instabilities** (Wortsman et al. 2023), warned as they happen: attention logit growth and
      attention entropy collapse per attention layer (-> qk-layernorm), output logit divergence (-> z-loss), and
      Adam's ε dominating a parameter's updates (-> a smaller ε); only for a model with attention modules and an
      Adam optimizer.

    At the end of fit, one report: ``health.md`` in the run's folder, the same in TensorBoard's Text tab
    (``health/report``), a W&B table or an MLflow artifact, and its verdict on the console.

    Args:
        every_n_steps: the monitors' scalars (and the diagnoses) every n optimizer steps, and at step 0;
            default ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: default about 5 a fit, plus step 0 and the end.
        num_classes: ``C`` of the uniform-guess loss ``ln(C)``; default: the ``out_features`` of the model's last
            ``nn.Linear`` (the report says which); ``0``: no loss check (a model whose loss is not a cross-entropy).
        trace: record the cheap numbers of every step (the loss-spike diagnosis needs them).
        report: write the report (``health.md`` and the loggers') and print the init check and the verdict.
        warn: the monitors' health warnings as they happen.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import HealthMonitor

        trainer = Trainer(callbacks=[HealthMonitor()])  # then read lightning_logs/version_0/health.md
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        num_classes: int | None = None,
        trace: bool = True,
        report: bool = True,
        warn: bool = True,
    ) -> None:
        for arg, value in (("trace", trace), ("report", report), ("warn", warn)):
            if not isinstance(value, bool):
                raise ValueError(f"Expected `{arg}` to be a bool, but got {value!r}.")
        cadence = {"every_n_steps": every_n_steps, "figure_every_n_steps": figure_every_n_steps}
        monitors = [
            ActivationMonitor(histogram_every_n_steps=histogram_every_n_steps, warn=warn, **cadence),
            GradientMonitor(histogram_every_n_steps=histogram_every_n_steps, warn=warn, **cadence),
            ParameterMonitor(histogram_every_n_steps=histogram_every_n_steps, warn=warn, **cadence),
            UpdateRatioMonitor(warn=warn, **cadence),
        ]
        scalars = Cadence(every_n_steps, 0, 0)  # the diagnoses' probes: scalars only, on the monitors' steps
        self.loss = LossProbe(scalars, num_classes)
        judges = [InitCheck(), LearningRateAdvice(), LossSpikes(), OutlierActivations(), NotZeroCentred()]
        judges.append(FrozenLayers())
        #: the diagnoses: the loss probe and the judges that read every probe; reported, not warned one by one
        self.diagnoses = Part(type(self).__name__, [self.loss, FrozenProbe(scalars)], judges, warn=False)
        #: the Transformer instabilities (a model with attention modules, an Adam optimizer; else they watch
        #: nothing): warned as they happen, so that a run can be stopped before it diverges
        transformer = [AttentionProbe(cadence=scalars), OutputLogitsProbe(cadence=scalars, require_attention=True)]
        transformer_judges = [AttentionLogitGrowth(), AttentionEntropyCollapse(), OutputLogitDivergence()]
        self.transformer = Part(
            type(self).__name__,
            [*transformer, AdamEpsProbe(scalars)],
            [*transformer_judges, EpsDominatedUpdates()],
            warn=warn,
        )
        #: what the loss is given (probabilities to `cross_entropy`...): a bug in the code, warned at once
        self.loss_input = Part(
            type(self).__name__,
            [LossInputProbe(scalars), InputProbe(scalars), ValidationProbe()],
            [LossInputCheck(), SmallBatch(), NoisyLabels(), UnnormalisedInputs()],
            warn=warn,
        )
        # one recorder of the four monitors' parts and these (`CallbackGroup`), made once, with them all
        super().__init__(
            monitors,
            parts=[getattr(self, name) for name in PARTS],
            trace=trace,
            report=Report() if report else None,
        )

    @property
    def findings(self) -> list:
        """Every finding of the last fit, in the order found (the monitors' and the diagnoses')."""
        assert self.recorder is not None
        return [f for part in self.recorder.parts for f in part.record.findings]

    @property
    def report(self) -> Report | None:
        """The last fit's report (its ``verdict``, ``text`` and ``path``), or None with ``report=False``."""
        return self.recorder.report if self.recorder is not None else None

    @override
    def state_dict(self) -> dict[str, Any]:
        # the parts the four monitors do not save themselves (their findings and judges' states); a checkpoint
        # written before a part existed resumes it empty
        return {name: getattr(self, name).state_dict() for name in PARTS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in PARTS:
            getattr(self, name).load_state_dict(state_dict.get(name, {}))
