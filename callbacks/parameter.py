"""Parameters, their gradients and their updates: ``ParameterMonitor``, ``UpdateRatioMonitor``.

Each is a monitor (``callbacks._monitor``): one probe (``callbacks.probes.parameter``, ``callbacks.probes.update``)
and its health judges, recorded by one recorder (``callbacks._recorder``). Both read the parameters in
``on_before_optimizer_step``, where the gradients are final (accumulated, all-reduced by DDP, unscaled by AMP); with
several optimizers each optimizer's parameters are read before its own step. Under DDP and FSDP2 the statistics and
histograms are those of the full tensors, from rank zero's copy or every rank's shard, never gathered.
"""

from collections.abc import Sequence
from typing import Any

from callbacks._cadence import Cadence
from callbacks._monitor import Monitor, check_flag
from callbacks._selection import check_patterns
from callbacks.judges.health import LearningRate, NonFinite, VanishingParameterGradients
from callbacks.probes.parameter import ParameterGradients, ParameterProbe
from callbacks.probes.update import UpdateProbe


def _check_ndim(min_ndim: int) -> int:
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
        raise ValueError(f"Expected `min_ndim` to be an int >= 0, but got {min_ndim!r}.")
    return min_ndim


class ParameterMonitor(Monitor):
    r"""Logs parameters and their gradients: the lecture's weight-gradient statistics and grad:data ratio.

    For each selected parameter ``name`` (from ``named_parameters()``), on logged steps, read right
    before the optimizer step:

    - histograms ``param/{name}`` and ``param_grad/{name}`` (TensorBoard, W&B);
    - scalars ``param_grad/{name}/std``, ``param_grad/{name}/grad_to_data`` (``grad.std() / data.std()``)
      and ``param_grad/{name}/nonfinite`` (from the first step with NaN/inf on).

    The figure ``param_grad/distribution`` overlays every gradient histogram with a legend of mean, std
    and grad:data ratio. Parameters without a gradient this step (frozen, unused) get ``param/`` only.
    A ratio below ``vanishing_grad_to_data`` for 3 logged steps is warned about once.

    Args:
        params: ``fnmatch`` patterns of parameter names; default: all trainable ones with ``min_ndim``.
        min_ndim: only parameters with at least this many dims; default 2 (weights and embeddings, not
            biases or norm gains), as in the lecture.
        every_n_steps: log scalars every n optimizer steps (and at step 0 of a fresh fit); default
            ``Trainer(log_every_n_steps)``.
        histogram_every_n_steps: default ``10 * every_n_steps``; ``0`` turns histograms off.
        figure_every_n_steps: first histogram step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        bins: at most this many histogram bins (at least 2).
        vanishing_grad_to_data: grad:data ratio below which a parameter's gradient is "vanishing".
        warn: emit health warnings.

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import ParameterMonitor

        trainer = Trainer(callbacks=[ParameterMonitor(params=["net.*.weight"])])
    """

    def __init__(
        self,
        params: Sequence[str] | None = None,
        min_ndim: int = 2,
        every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        bins: int = 64,
        vanishing_grad_to_data: float = 1e-5,
        warn: bool = True,
    ) -> None:
        cadence = Cadence(every_n_steps, histogram_every_n_steps, figure_every_n_steps)
        self.params = check_patterns(params, "params")
        self.min_ndim = _check_ndim(min_ndim)
        if isinstance(vanishing_grad_to_data, bool) or not isinstance(vanishing_grad_to_data, (int, float)):
            raise ValueError(f"Expected `vanishing_grad_to_data` to be a number, but got {vanishing_grad_to_data!r}.")
        self.vanishing_grad_to_data = float(vanishing_grad_to_data)
        probe = ParameterProbe(self.params, self.min_ndim, cadence, bins)
        judges = [VanishingParameterGradients(self.vanishing_grad_to_data), NonFinite(ParameterGradients)]
        super().__init__(probe, judges, check_flag(warn, "warn"))

    def _state_key_args(self) -> dict[str, Any]:
        return {"params": list(self.params or ()), "min_ndim": self.min_ndim}


class UpdateRatioMonitor(Monitor):
    r"""Logs the update:data ratio of each parameter, ``log10(std(p_after - p_before) / std(p_before))``.

    Measured around the optimizer step on logged steps (a copy of the parameters is taken in
    ``on_before_optimizer_step`` on those steps only, and let go as each update is summarised), so it holds for
    any optimizer: for plain SGD it is the lecture's ``log10((lr * grad).std() / p.std())``. Logs scalars
    ``update_ratio/{name}`` and the figure ``update_ratio/history`` (every ratio over time, guide line at -3:
    "about 1e-3 is healthy"). When the median parameter's ratio stays outside ``[low, high]`` for ``patience``
    consecutive logged steps, the learning rate is warned about once (too low / too high). The median, because
    the learning rate is shared: one parameter far above the rest, like an output layer scaled down at init, is
    expected early on and raises nothing. The history is part of the checkpoint, so a resumed run continues its
    curves.

    Args:
        params: ``fnmatch`` patterns of parameter names; default: all trainable ones with ``min_ndim``.
        min_ndim: only parameters with at least this many dims (default 2, as in the lecture).
        every_n_steps: measure every n optimizer steps (and at step 0 of a fresh fit); default
            ``Trainer(log_every_n_steps)``.
        figure_every_n_steps: first logged step, every n steps and end of fit; default about 5 a fit;
            ``0``: only the first and the end of fit.
        low: log10 ratio below which updates are too small (learning rate too low).
        high: log10 ratio above which updates are too large (learning rate too high).
        patience: consecutive logged steps out of ``[low, high]`` before warning.
        warn: emit health warnings.

    Attributes:
        steps: the logged steps so far (the history's x axis).
        history: per parameter, the log10 ratio at each of ``steps`` (NaN where not measured).

    Raises:
        MisconfigurationException: with ``Trainer(logger=False)``.
        ValueError: for invalid arguments.

    Example::

        from lightning.pytorch import Trainer
        from callbacks import UpdateRatioMonitor

        trainer = Trainer(log_every_n_steps=10, callbacks=[UpdateRatioMonitor()])
    """

    def __init__(
        self,
        params: Sequence[str] | None = None,
        min_ndim: int = 2,
        every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
        low: float = -4.0,
        high: float = -2.0,
        patience: int = 10,
        warn: bool = True,
    ) -> None:
        cadence = Cadence(every_n_steps, None, figure_every_n_steps)
        self.params = check_patterns(params, "params")
        self.min_ndim = _check_ndim(min_ndim)
        for arg, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Expected `{arg}` to be a number, but got {value!r}.")
        if low >= high:
            raise ValueError(f"Expected `low` < `high`, but got low={low} and high={high}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Expected `patience` to be an int >= 1, but got {patience!r}.")
        self.low, self.high, self.patience = float(low), float(high), patience
        probe = UpdateProbe(self.params, self.min_ndim, cadence)
        super().__init__(probe, [LearningRate(self.low, self.high, patience)], check_flag(warn, "warn"))

    @property
    def steps(self) -> list[int]:
        return self.probe.steps

    @property
    def history(self) -> dict[str, list[float]]:
        return self.probe.history

    def _state_key_args(self) -> dict[str, Any]:
        return {"params": list(self.params or ()), "min_ndim": self.min_ndim}
