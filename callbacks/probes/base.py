"""What a probe is: the tensors it watches, when it records them, and what their summaries mean.

A probe follows the contract of torchmetrics' ``Metric``, split over a training step by the recorder
(``callbacks._recorder``), which owns the step and calls it:

1. ``attach`` at the start of fit: choose what to watch (modules, parameters);
2. on a step it records, ``on_output`` (a watched module's forward output), ``before_optimizer_step`` and
   ``end_step``: put tensors into the step's pool (``rec.add``), where each is summarised and let go;
3. ``tags``: what the recorder reduces for it (the same on every rank), in one reduction with every other probe;
4. ``read``: the reduced summaries as a *readout*, plain numbers per layer, which the judges read and
   ``scalars`` / ``histograms`` / ``draw`` / ``rows`` turn into what the writers write.

``reset`` forgets a previous fit (a fit that does not resume starts clean); ``state_dict`` keeps what a resumed
run needs. A probe never touches a logger, a hook handle or another probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from callbacks._cadence import Cadence, Moment
from callbacks._stats import Packed, Pool, Summary

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.optim import Optimizer


#: how a declared state is reduced over the calls of a step, its micro-batches and the ranks (see `Probe.add_state`)
Reduce = Literal["sum", "max", "min", "mean"]
#: each reduction's identity: a state's value at the start of every recorded step (what a rank that saw nothing adds)
IDENTITY: dict[str, float] = {"sum": 0.0, "mean": 0.0, "max": -math.inf, "min": math.inf}


@dataclass(frozen=True)
class State:
    """A declared state: its shape and how it reduces."""

    shape: tuple[int, ...]
    reduce: Reduce


@dataclass(frozen=True)
class Chart:
    """A dashboard chart of one statistic of every layer: ``title``, the series tag each layer's line is written
    under on TensorBoard (each layer a run of its own, so it has its own colour), its place (``order``: the built-in
    charts take 10-83; None, a new probe's default: after every numbered chart, in the order first written) and a
    constant ``guide`` line drawn with them (None: none)."""

    title: str
    series: str
    order: int | None = None
    guide: float | None = None


@dataclass(frozen=True)
class Scalar:
    """One logged number: ``tag`` as every logger gets it; ``layer`` and ``chart`` place it on the dashboard."""

    tag: str
    value: float
    layer: str | None = None
    chart: Chart | None = None


class Recording:
    """A step as probes see it: where tensors go (``add``), what the step records, and its trace row.

    Made by the recorder for each step it records (``moments``: what each probe records; empty on a step that is
    only traced) and, when it traces, for every step: a few cheap numbers a step (``trace``), kept on the device
    in a ring the judges read. An error inside a probe is kept here (``guard``) and raised on every rank after the
    step's reduction, so no rank waits forever for another.
    """

    def __init__(
        self,
        step: int,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        moments: dict[Any, Moment],
        tracing: bool = False,
    ) -> None:
        self.step = step
        self.trainer = trainer
        self.pl_module = pl_module
        self.moments = moments  # probe -> what it records on this step
        self.tracing = tracing
        self.pool = Pool()
        #: ``add(tag, x, histogram, saturation, relu_like)``: summarises ``x`` into ``tag``, keeping nothing of it
        self.add = self.pool.add
        self.traced: dict[tuple[str, ...], Tensor] = {}  # trace columns -> their values on the device
        self.error: BaseException | None = None

    def trace(self, columns: str | tuple[str, ...], values: Tensor) -> None:
        """Puts this step's values of trace ``columns`` (one column: a 0-dim tensor; several: 1-D), left on the
        device until the judges read the trace."""
        self.traced[(columns,) if isinstance(columns, str) else columns] = values

    @property
    def world_size(self) -> int:
        return self.trainer.world_size

    def guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn``, keeping its first error for the end of the step instead of raising it."""

        def guarded(*args: Any) -> None:
            if self.error is not None:
                return
            try:
                fn(*args)
            except Exception as error:  # raised on every rank after the reduction
                self.error = error

        return guarded


class Probe:
    """Base class of the probes: the defaults are "nothing to do" (see the module docstring).

    Args:
        cadence: when it records.
        bins: histogram bins (at most; at least 2).
    """

    #: tag prefix, e.g. ``"activation"``; also the name of its figure and summary
    prefix: ClassVar[str] = ""
    #: the tag of its figure (None: no figure)
    figure_tag: ClassVar[str | None] = None
    #: the attributes :meth:`draw` reads (what :meth:`drawing` copies; plain data, replaced at each step)
    drawn_from: ClassVar[tuple[str, ...]] = ("last",)
    #: whether it has histograms (its figure is drawn from them; without, on its scalar steps)
    has_histograms: ClassVar[bool] = True

    def __init__(self, cadence: Cadence, bins: int = 64) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"Expected `bins` to be an int >= 1, but got {bins!r}.")
        self.cadence = cadence
        self.bins = bins
        self._states: dict[str, State] = {}  # declared with `add_state`, in declaration order

    # -- declared state
    def add_state(self, name: str, reduce: Reduce, shape: int | tuple[int, ...] = ()) -> None:
        """Declares a reducible state ``self.<name>``, as torchmetrics' ``Metric.add_state`` does.

        On each step the probe records, ``self.<name>`` starts as a float64 tensor of ``shape`` on the model's
        device, filled with the identity of ``reduce`` (0 for ``"sum"`` and ``"mean"``, -inf for ``"max"``, +inf
        for ``"min"``); the step methods accumulate into it in place (``self.<name> += x``, ``self.<name>[i] = ...``,
        ``torch.maximum(self.<name>, x, out=self.<name>)``). After the step the recorder reduces every probe's states
        with one collective per kind (over module calls, micro-batches and ranks: ``"sum"`` adds, ``"max"``/``"min"``
        keep the extreme, ``"mean"`` is the mean over ranks of each rank's value) and :meth:`read` finds the reduced
        values in ``self.<name>``, a float64 tensor on the CPU. Declare in ``__init__``, or in :meth:`attach` when
        the shape depends on the model (one entry per watched layer): the same shapes on every rank.

        Args:
            name: the attribute; declaring it again replaces it (a new fit, another model).
            reduce: ``"sum"``, ``"max"``, ``"min"`` or ``"mean"``.
            shape: the state's shape: ``()`` for one number, ``n`` or a tuple for one entry per layer.

        Raises:
            ValueError: for a name that is not an identifier or shadows a method, or an unknown ``reduce``.
        """
        if not name.isidentifier() or (name not in self._states and hasattr(self, name)):
            raise ValueError(f"Expected `name` to be a new attribute name of {type(self).__name__}, but got {name!r}.")
        if reduce not in get_args(Reduce):
            raise ValueError(f"Expected `reduce` to be one of {list(get_args(Reduce))}, but got {reduce!r}.")
        size = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in size):
            raise ValueError(f"Expected `shape` to be an int >= 0 or a tuple of them, but got {shape!r}.")
        self._states[name] = State(size, reduce)
        setattr(self, name, torch.full(size, IDENTITY[reduce], dtype=torch.float64))

    def start_states(self, device: torch.device) -> None:
        """Every declared state at its identity on ``device``: the start of a step it records (the recorder's)."""
        for name, state in self._states.items():
            setattr(self, name, torch.full(state.shape, IDENTITY[state.reduce], dtype=torch.float64, device=device))

    # -- a fit
    def reset(self) -> None:
        """Forgets everything of a previous fit (its arguments stay); a probe that overrides it calls it too."""
        self.latest: Any = None  # the last readout (the end-of-fit table)
        self.last: Any = None  # the last readout with histograms (the figure)
        self._nonfinite: set[str] = set()  # tags with a `/nonfinite` curve

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Chooses what to watch, at the start of fit."""

    def detach(self) -> None:
        """Lets go of the model, at the end of fit."""

    def stop(self) -> None:
        """Undoes what a step did to the model (a probe that intercepts a function restores it): called when the
        recorder stops, at the end of fit and on an exception, which a step cut short never reaches ``end_step`` from.
        Safe to call at any time, and again."""

    def watching(self, trainer: pl.Trainer) -> bool:
        """Whether it has anything to record in this fit, asked at the start of each step it would record (after
        :meth:`attach`; the same answer on every rank). False (a Transformer probe on a model without attention, the
        Adam probe without an Adam optimizer): the recorder leaves it out of the step altogether (no states, no
        readout; the judges that read it are not asked). True by default."""
        return True

    def watched_modules(self) -> Sequence[tuple[str, nn.Module]]:
        """``(name, module)`` whose forward outputs go to :meth:`on_output` on recorded steps."""
        return ()

    def trace_columns(self) -> list[str]:
        """The columns it fills in the every-step trace (``rec.trace``) when the recorder traces; none by default.

        Called once a fit, after :meth:`attach`. A probe with none is never called on a step it does not record.
        """
        return []

    # -- a recorded step
    def on_output(self, rec: Recording, name: str, output: Tensor) -> None:
        """A watched module's forward output (the first floating-point tensor of it).

        The step methods (this one, :meth:`before_backward`, :meth:`before_optimizer_step`, :meth:`end_step`) are
        called on the steps this probe records (``self in rec.moments``), and only
        there, unless it traces: a probe with :meth:`trace_columns` is also called on every step while the recorder
        traces (``rec.tracing``), and one that records more than its trace returns after its trace when
        ``self not in rec.moments`` (a step that is only traced).
        """

    def on_input(self, rec: Recording, name: str, input: Tensor) -> None:
        """A watched module's forward input (the first tensor of its positional arguments), on the same steps as
        :meth:`on_output`: called only for a probe that overrides it."""

    def before_backward(self, rec: Recording) -> None:
        """The loss of a micro-batch is computed and its backward is about to start."""

    def before_optimizer_step(self, rec: Recording, optimizer: Optimizer) -> None:
        """Right before ``optimizer`` steps: its gradients are final."""

    def validated(self, trainer: pl.Trainer) -> Any:
        """After a validation run (not the sanity check), on every rank: a readout the recorder keeps as this
        probe's last (what the judges' ``conclude`` reads), or None (nothing to read; the default)."""
        return None

    def end_step(self, rec: Recording, outputs: Any) -> None:
        """The step's last micro-batch has ended (``outputs``: what ``training_step`` returned)."""

    def tags(self, moment: Moment) -> tuple[list[str], set[str]]:
        """The tags to reduce on a step recording ``moment`` and those with histograms: the same on every rank."""
        return [], set()

    # -- reading the reduced step
    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> Any:
        """The step's readout: plain numbers per layer, for the judges and the writers (None: nothing)."""
        return None

    def scalars(self, readout: Any) -> list[Scalar]:
        return []

    def histograms(self, readout: Any) -> dict[str, Summary]:
        return {}

    def draw(self) -> Figure | None:
        """Its figure from its last data (None: nothing to draw)."""
        return None

    def drawing(self) -> Callable[[], Figure | None]:
        """What draws its figure from its data as they are now, called later beside training (`callbacks._background`).

        By default :meth:`draw` of a bare copy of the probe that holds only the attributes in ``drawn_from`` (so it
        pickles to the figure process without the model): right for a probe whose steps replace what ``draw``
        reads (``self.last = readout``); a probe that changes it in place (a growing history) copies it here.
        """
        snapshot = object.__new__(type(self))
        snapshot.__dict__.update({name: getattr(self, name) for name in self.drawn_from if hasattr(self, name)})
        return snapshot.draw

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """The end-of-fit table of its last values: (column names, rows of formatted cells)."""
        return [], []

    # -- helpers of the probes
    def _keep(self, readout: Any, moment: Moment, seen: bool) -> Any:
        """Keeps ``readout`` as ``latest`` (the end-of-fit table) and, on a histogram step, as ``last`` (the figure),
        when something was ``seen``; returns it."""
        if seen:
            self.latest = readout
            if moment.histograms:
                self.last = readout
        return readout

    def _nonfinite_scalar(self, tag: str, count: int) -> list[Scalar]:
        """``{tag}/nonfinite`` from the first step with NaN/inf on (a healthy run has no such curve)."""
        if count:
            self._nonfinite.add(tag)
        return [Scalar(f"{tag}/nonfinite", float(count))] if tag in self._nonfinite else []

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _declared(p: Probe, name: str, state: State) -> tuple[Tensor, ValueError | None]:
    """The probe's state ``name`` as it stands, or its identity and the error when it is no longer a tensor of its
    declared size."""
    value = getattr(p, name, None)
    if isinstance(value, Tensor) and value.numel() == math.prod(state.shape):
        return value, None
    error = ValueError(
        f"Expected `{type(p).__name__}.{name}` to be a tensor of shape {state.shape} (its declared state),"
        f" but got {value!r}: accumulate into it in place (`self.{name} += x`)."
    )
    return torch.full(state.shape, IDENTITY[state.reduce], dtype=torch.float64), error


def pack_states(probes: Iterable[Probe], device: torch.device) -> tuple[Packed, BaseException | None]:
    """The declared states of ``probes`` in one vector per collective: sums (``"sum"``, ``"mean"``) and maxes
    (``"max"``, and ``"min"`` negated), in probe and declaration order, their sizes those declared (the same on every
    rank). A state that is no longer a tensor of its declared size takes part as its identity, and the error is
    returned (raised on every rank after the collectives)."""
    sums: list[Tensor] = []
    maxes: list[Tensor] = []
    error: BaseException | None = None
    for p in probes:
        for name, state in p._states.items():
            value, bad = _declared(p, name, state)
            error = error or bad
            if value.device != device or value.dtype != torch.float64:
                value = value.to(device=device, dtype=torch.float64)
            value = value.detach().reshape(-1)
            if state.reduce in ("sum", "mean"):
                sums.append(value)
            else:
                maxes.append(value if state.reduce == "max" else -value)
    empty = Packed.empty(device)
    return Packed(torch.cat(sums) if sums else empty.sums, torch.cat(maxes) if maxes else empty.maxes), error


def local_states(probes: Iterable[Probe]) -> BaseException | None:
    """:func:`pack_states` and :func:`unpack_states` for one process on the CPU, where there is nothing to reduce: each
    declared state stays where the probe accumulated it, as a float64 CPU tensor of its declared shape. A state that
    is no longer a tensor of its declared size becomes its identity, and the error is returned (raised after the
    step's reduction, as with several processes)."""
    error: BaseException | None = None
    for p in probes:
        for name, state in p._states.items():
            value, bad = _declared(p, name, state)
            error = error or bad
            where = (value.device.type, value.dtype, value.shape)
            if bad is not None or where != ("cpu", torch.float64, state.shape):
                setattr(p, name, value.detach().to(device="cpu", dtype=torch.float64).reshape(state.shape))
    return error


def unpack_states(probes: Iterable[Probe], sums: list[float], maxes: list[float], world_size: int) -> None:
    """Puts the reduced vectors of :func:`pack_states` back into each probe's states, by name, on the CPU."""
    at_sum = at_max = 0
    for p in probes:
        for name, state in p._states.items():
            n = math.prod(state.shape)
            if state.reduce in ("sum", "mean"):
                values, at_sum = sums[at_sum : at_sum + n], at_sum + n
                if state.reduce == "mean":
                    values = [v / world_size for v in values]
            else:
                values, at_max = maxes[at_max : at_max + n], at_max + n
                if state.reduce == "min":
                    values = [-v for v in values]
            setattr(p, name, torch.tensor(values, dtype=torch.float64).reshape(state.shape))


def draw_summaries(curves: Iterable[tuple[str, Summary, str]], title: str, xlabel: str = "value") -> Figure | None:
    """The lecture's overlaid distributions of ``(label, summary, legend)`` curves, those with a histogram;
    ``None`` when none has one (a step recorded without histograms)."""
    from callbacks.figures import Distribution, plot_distributions

    data = {label: Distribution(s.edges, s.counts, legend) for label, s, legend in curves if s.edges is not None}
    return plot_distributions(data, title, xlabel=xlabel) if data else None


def first_tensor(output: Any) -> Tensor | None:
    """The module's output tensor, or the first floating-point tensor of a tuple/list output."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor) and item.is_floating_point():
                return item
    return None
