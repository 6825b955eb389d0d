"""Training-health callbacks for any LightningModule: the diagnostics of makemore part 3.

- :class:`ActivationMonitor`: forward activations per layer (mean, std, saturation, dead units, histograms).
- :class:`GradientMonitor`: gradients w.r.t. those activations.
- :class:`ParameterMonitor`: parameters and their gradients, with the grad:data ratio.
- :class:`UpdateRatioMonitor`: log10 of the update:data ratio per parameter, over time.
- :class:`HealthMonitor`: all of them, the lecture's diagnoses (what is wrong, where, what to change) and one
  health report per fit (``health.md``).
- the Transformer instabilities (attention logits and entropy, output log Z, Adam's ε) are probes and judges of
  :class:`HealthMonitor`: ``callbacks.probes.attention``, ``.logits``, ``.adam``, ``callbacks.judges.transformer``.
- :class:`Monitor`: a monitor of your own: one probe and its judges (see the docs' "Write your own probe").
- :class:`CallbackGroup`: several callbacks dispatched as one (its monitors record as one).
- :func:`register_activation`: teach the default selection a module class of your own (bounded, ReLU-like, other).
- :class:`HealthWarning`: the category of the monitors' warnings (filter it like any warning).
- :mod:`callbacks.figures`: the lecture-style figures, usable from scripts.

Inside, data flows one way: probes (``callbacks.probes``: what is watched and what a summary means) -> one
recorder (``callbacks._recorder``: the step, the hooks, one reduction, the state) -> judges
(``callbacks.judges``: findings from summaries) -> writers (``callbacks._writers``: one per logger kind).

This package depends on Lightning and PyTorch only; it never imports ``lightning_makemore``.
"""

from callbacks._activation_kinds import register_activation
from callbacks._monitor import Monitor
from callbacks._warnings import HealthWarning
from callbacks.activation import ActivationMonitor, GradientMonitor
from callbacks.group import CallbackGroup
from callbacks.health import HealthMonitor
from callbacks.parameter import ParameterMonitor, UpdateRatioMonitor

__all__ = [
    "ActivationMonitor",
    "CallbackGroup",
    "GradientMonitor",
    "HealthMonitor",
    "HealthWarning",
    "Monitor",
    "ParameterMonitor",
    "UpdateRatioMonitor",
    "register_activation",
]
