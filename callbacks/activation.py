"""Forward activations and their gradients, per watched module: ``ActivationMonitor``, ``GradientMonitor``.

Each is a monitor (``callbacks._monitor``): one probe (``callbacks.probes``) and its health judges
(``callbacks.judges.health``), recorded by one recorder (``callbacks._recorder``). On recorded steps a forward hook
on each watched module hands its output to the probe, which summarises it (and, for gradients, registers a tensor
hook to see ``dL/d output`` in backward) and lets it go; the step's summaries are reduced across ranks and written
after the optimizer step. A compiled model runs its recorded steps eagerly so the hooks fire
(``callbacks._compile``).
"""

from collections.abc import Sequence

from callbacks._cadence import Cadence
from callbacks._monitor import Monitor, check_flag, check_positive
from callbacks._selection import ModuleSpec, check_specs
from callbacks.judges.health import DeadUnits, NonFinite, Saturation, VanishingGradients
from callbacks.probes.activation import ActivationProbe, Activations
from callbacks.probes.gradient import GradientProbe, Gradients


class ActivationMonitor(Monitor):
    r"""Logs the forward outputs of selected modules: the lecture's activation statistics, on any model.

    For each selected module ``name`` (its qualified name in ``named_modules()``), on logged steps:

    - histogram ``activation/{name}`` (TensorBoard, W&B);
    - scalars ``activation/{name}/mean``, ``/std``, ``/nonfinite`` (NaN/inf count, left out of the other statistics;
      logged from the first step that has any);
    - ``activation/{name}/saturation`` for bounded outputs (tanh, sigmoid, hardtanh, ...): the share
      with ``|y - center| > saturation_threshold * half_range``, i.e. ``|y| > 0.97`` for tanh and
      ``|2y - 1| > 0.97`` for sigmoid;
    - ``activation/{name}/dead`` for ReLU-like outputs: the share of units never positive in the batch,
      where a unit is a position over all dims but the first (the batch dim): a hidden feature of an
      MLP, a (channel, y, x) of a CNN, a (token, feature) of a Transformer. With several devices or
      micro-batches, it is the share over each device's micro-batch, pooled.

    A figure ``activation/distribution`` overlays every layer's histogram with a legend of mean, std
    and saturation (Images tab), and a summary table goes to the Text tab at the end of fit.
    Statistics are global across DDP ranks and pooled over the micro-batches of an accumulated step.
    A module called several times per forward pools all its calls; under activation checkpointing, the
    forward run again in backward is not counted twice.

    Args:
        modules: module types and/or ``fnmatch`` patterns of qualified names to watch, e.g.
            ``[nn.Tanh, "blocks.*.act"]``. Default: every activation module (Tanh, ReLU, GELU, SiLU,
            Sigmoid, LeakyReLU, ELU, Softplus, Mish, Hardtanh, ReLU6, ...).
        every_n_steps: log scalars every n optimizer steps (and at step 0 of a fresh fit, before any
            update); default ``Trainer(log_every_n_steps)``. ``0`` turns scalars off.
        histogram_every_n_steps: log histograms every n steps (and at step 0 and the final step); default
            ``10 * every_n_steps``; ``0`` turns them off.
        figure_every_n_steps: the figure on the first histogram step (step 0: initialisation), every n
            steps (on histogram steps) and at the end of fit; default: about 5 over a fit of known length
            (else every ``2000 * every_n_steps``); ``0``: only the first and the end of fit.
        bins: at most this many histogram bins (at least 2): equal bins whose edges are multiples of their
            width, from at or below the min to above the max.
        saturation_threshold: share of the output range beyond which a bounded output is saturated.
        saturation_warning: warn once when a layer's saturation stays above this for 3 logged steps
            (calibrated on the lecture's runs: its healthy nets stay below 0.25, its naive init above 0.6).
        dead_warning: warn once when a layer's dead share stays above this for 3 logged steps (for activations
            with a gradient below zero, GELU, SiLU and the like, above the larger of this and 0.5: healthy
            Transformers have 12-20 % of such units never positive, and they still learn).
        warn: emit health warnings (they are listed in the summary either way).

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.loggers import TensorBoardLogger
        from callbacks import ActivationMonitor

        trainer = Trainer(logger=TensorBoardLogger("logs"), callbacks=[ActivationMonitor()])
    """

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        saturation_threshold: float = 0.97,
        saturation_warning: float = 0.4,
        dead_warning: float = 0.1,
        warn: bool = True,
    ) -> None:
        cadence = Cadence(every_n_steps, histogram_every_n_steps, figure_every_n_steps)
        self.modules = check_specs(modules, "modules")
        self.saturation_threshold = check_positive(saturation_threshold, "saturation_threshold", upper=1.0)
        self.saturation_warning = check_positive(saturation_warning, "saturation_warning", upper=1.0)
        self.dead_warning = check_positive(dead_warning, "dead_warning", upper=1.0)
        probe = ActivationProbe(self.modules, cadence, bins, self.saturation_threshold)
        judges = [
            Saturation(self.saturation_warning, self.saturation_threshold),
            DeadUnits(self.dead_warning),
            NonFinite(Activations),
        ]
        super().__init__(probe, judges, check_flag(warn, "warn"))

    def _state_key_args(self) -> dict:
        return {"modules": [getattr(m, "__name__", m) for m in self.modules or ()]}


class GradientMonitor(Monitor):
    r"""Logs the gradients of the loss w.r.t. the outputs of selected modules (the lecture's ``out.grad``).

    For each selected module ``name``, on logged steps: histogram ``activation_grad/{name}`` and scalars
    ``activation_grad/{name}/std`` and ``/nonfinite`` (no mean: it is ~0 by construction); the figure
    ``activation_grad/distribution`` overlays every layer's histogram. Healthy layers have gradients of
    similar std; a layer whose std is far below the largest one (``vanishing_ratio``) for 3 logged steps
    is warned about once. The values are the gradients of the loss of the global batch, as one process
    back-propagating it whole would see them: with ``accumulate_grad_batches`` Lightning divides each
    micro-batch's loss, and under DDP or FSDP each rank's gradients are divided by the data-parallel size
    (each rank back-propagates the mean loss of its own share). With 16-bit AMP they are multiplied by the
    loss scale.

    Args:
        modules: module types and/or ``fnmatch`` name patterns; default: every activation module.
        every_n_steps: log scalars every n optimizer steps (and at step 0 of a fresh fit); default
            ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: first histogram step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        bins: at most this many histogram bins (at least 2).
        vanishing_ratio: a layer whose gradient std is below this share of the largest layer's is
            "vanishing".
        warn: emit health warnings.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ActivationMonitor, GradientMonitor

        trainer = Trainer(callbacks=[ActivationMonitor(), GradientMonitor()])
    """

    def __init__(
        self,
        modules: Sequence[ModuleSpec] | None = None,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        vanishing_ratio: float = 1e-2,
        warn: bool = True,
    ) -> None:
        cadence = Cadence(every_n_steps, histogram_every_n_steps, figure_every_n_steps)
        self.modules = check_specs(modules, "modules")
        self.vanishing_ratio = check_positive(vanishing_ratio, "vanishing_ratio", upper=1.0)
        probe = GradientProbe(self.modules, cadence, bins)
        judges = [VanishingGradients(self.vanishing_ratio), NonFinite(Gradients)]
        super().__init__(probe, judges, check_flag(warn, "warn"))

    def _state_key_args(self) -> dict:
        return {"modules": [getattr(m, "__name__", m) for m in self.modules or ()]}
