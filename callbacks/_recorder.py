"""The recorder: the one callback that does the work. It owns the step for its probes, judges and writers.

Exactly one recorder records a fit's monitors: a monitor alone forwards Lightning's hooks to the recorder it makes
of its part (``callbacks._monitor``), a ``CallbackGroup`` to the one it makes of all its members' parts.

On every training step it decides, once for all its probes, what each records (``callbacks._cadence``: a pure
function of the step and the fit's ends). On a step that records anything it attaches one forward hook per
watched module (removed when the step ends), hands the probes the outputs, the optimizer steps and the end of
the step, then reduces every probe's summaries across ranks in one reduction (``callbacks._stats``), lets the
probes read them, asks the judges, and writes through one writer per logger (``callbacks._writers``). Between
recorded steps it has nothing to do, and sleeps (``callbacks._internals``: the one labelled trick).

Rank zero writes; every rank takes part in the same collectives. An error inside a hook or a probe is kept and
raised after the step's reduction on every rank; a write that fails on rank zero is raised on every rank at the
next reduction (or at the end of fit), so no rank waits forever for another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from callbacks._background import render, send_scalars, worker
from callbacks._cadence import OPEN, Cadence, last_step, logging_step, step_ends
from callbacks._compile import EagerSteps
from callbacks._internals import shadow_step_hooks
from callbacks._stats import Packed, Summary
from callbacks._trace import Trace
from callbacks._warnings import health_warning
from callbacks._writers import Writer, writers_for
from callbacks.judges.base import Finding, Judge, Readouts, Record
from callbacks.probes.base import (
    Probe,
    Recording,
    Scalar,
    first_tensor,
    local_states,
    pack_states,
    unpack_states,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(eq=False)
class Part:
    """What one monitor brings to a recorder: its probes, its judges and their record, and its name and switches."""

    name: str
    probes: list[Probe]
    judges: list[Judge] = field(default_factory=list)
    record: Record = field(default_factory=Record)
    warn: bool = True

    def __post_init__(self) -> None:
        for judge in self.judges:
            judge.record = self.record

    def reset(self) -> None:
        """A fit that does not resume starts clean (a resumed one loads its state after this)."""
        self.record.reset()
        for p in self.probes:
            p.reset()
        for j in self.judges:
            j.reset()

    def state_dict(self) -> dict[str, Any]:
        """Its record (findings included) and its judges' states (by position and class), for the checkpoint."""
        state = self.record.state_dict()
        judges = {f"{i}:{type(j).__name__}": s for i, j in enumerate(self.judges) if (s := j.state_dict())}
        if judges:
            state["judges"] = judges
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record.load_state_dict(state)
        judges = state.get("judges", {})
        for i, j in enumerate(self.judges):
            if (s := judges.get(f"{i}:{type(j).__name__}")) is not None:
                j.load_state_dict(s)

    def summary_text(self, probe: Probe, step: int) -> str:
        """The end-of-fit summary of ``probe`` as markdown: the table of its last values, then the warnings."""
        columns, rows = probe.rows()
        lines = [f"**{self.name}**, last logged step {step}", ""]
        if columns:
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "**Warnings**: " + ("none" if not self.record.warned else ""), ""]
        lines += [f"- {m}" for m in self.record.warned.values()]
        return "\n".join(lines)


class Recorder(Callback):
    """Records its parts' probes on the steps their cadences choose, and judges and writes what they read.

    Everything it records is given at construction (``parts``, ``trace``, ``report``) and fixed from then on. It is
    made once for the callback Lightning sees: a monitor alone makes one of its part (``callbacks._monitor``),
    ``CallbackGroup`` one of all its monitors' parts and its own (``HealthMonitor``'s diagnoses), so a step records,
    reduces and writes once for all of them. The monitors themselves are not recorders.
    """

    def __init__(self, parts: Iterable[Part], name: str | None = None, trace: bool = False, report: Any = None) -> None:
        self.parts = tuple(parts)
        self.name = name or type(self).__name__  # in its messages
        self.trace = trace  # record the probes' cheap numbers on every step (see `callbacks._trace`)
        self.report = report  # what collects every finding into one report (a `callbacks._report.Report`)
        self._trace: Trace | None = None
        self._last: dict[str, Any] = {}  # each probe's last readout (for the judges' conclusions)
        self._state_key: str | None = None
        self._asleep = False  # step hooks shadowed (see `_sleep`)
        self._wake = -1  # nothing to do before this step
        self._skip = 0  # batches to let pass without a look, asleep (each batch is at most one step further)
        self._step = -1  # the logging step of the current (or last) batch
        self._first: int | None = None  # the fit's first step
        self._origin: tuple[int, int] | None = None  # (logging step, global step) at the first batch
        self._rate: float | None = None  # optimizer steps per logging step (manual optimization)
        self._last_step = OPEN  # the fit's last step, as known at the current one
        self._cadences: dict[Probe, Cadence] = {}  # each probe's, resolved against the Trainer
        self._rec: Recording | None = None  # the step being recorded
        self._called: list[Probe] = []  # the probes whose step methods run on it (see `_begin`)
        self._tracers: set[Probe] = set()  # the probes that fill trace columns (when it traces)
        self._in_backward = False  # between on_before_backward and on_after_backward (activation recomputation)
        self._hooks: list[tuple[nn.Module, Callable[..., None]]] = []  # one forward hook per watched module
        self._handles: list[RemovableHandle] = []  # registered on recorded steps only
        self._eager = EagerSteps()  # compiled models run eagerly on recorded steps (see `callbacks._compile`)
        self._pending: BaseException | None = None  # a write that failed on this rank (see `_write_guarded`)
        self._figure_steps: dict[Probe, int] = {}  # the step of each probe's last figure
        self._figure_errors: list[tuple[str, Exception]] = []  # figure jobs that raised (appended by the worker)
        self._figure_warned = False  # the first figure error of a fit is reported, once
        self._data_steps: dict[Probe, int] = {}  # the step of each probe's last figure data (histograms, or scalars)

    @property
    def idle(self) -> bool:
        """Whether it has nothing to do before a later step (its step hooks sleep)."""
        return self._asleep

    def pass_batch(self) -> bool:
        """Whether this batch, asleep, cannot have reached the step it wakes at (counted: then nothing is read, not
        even the step). Its ``on_train_batch_start`` asks first; so does a group, before calling it."""
        if self._skip:
            self._skip -= 1
            return True
        return False

    @property
    def probes(self) -> list[Probe]:
        return [p for part in self.parts for p in part.probes]

    def _judges(self) -> Iterable[tuple[Part, Judge]]:
        return ((part, j) for part in self.parts for j in part.judges)

    # ------------------------------------------------------------------ a fit
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise MisconfigurationException(
                f"Cannot use `{self.name}` callback with `Trainer(logger=False)`: it writes to the"
                " Trainer's loggers. Add one, e.g. `Trainer(logger=TensorBoardLogger('logs'))` for the"
                " histograms and figures, or `CSVLogger('logs')` for the scalars only."
            )
        for part in self.parts:
            part.reset()  # a resumed fit loads its state after `setup`
        writers = writers_for(trainer.loggers)
        # histograms are binned when some logger shows them or the figures drawn from them
        shown = any(w.histograms or w.figures for w in writers)
        self._cadences = {
            p: p.cadence.resolve(trainer.log_every_n_steps, p.has_histograms and shown) for p in self.probes
        }
        self._step, self._wake, self._first, self._origin, self._rate = -1, -1, None, None, None
        self._skip = 0
        self._figure_steps, self._data_steps, self._last = {}, {}, {}
        self._figure_errors, self._figure_warned = [], False
        if self.report is not None:
            self.report.reset()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_handles()
        targets: dict[nn.Module, list[tuple[Probe, str]]] = {}
        for p in self.probes:
            p.attach(trainer, pl_module)
            for name, module in p.watched_modules():
                targets.setdefault(module, []).append((p, name))
        self._hooks = [(module, self._forward_hook(pairs)) for module, pairs in targets.items()]
        self._eager.setup(pl_module, bool(self._hooks), self.name)
        columns = {p: p.trace_columns() for p in self.probes} if self.trace else {}
        # the probes whose step methods also run on a step that is only traced: those that fill trace columns
        self._tracers = {p for p, c in columns.items() if c}
        flat = [c for cs in columns.values() for c in cs]
        self._trace = Trace(flat, trainer.strategy.root_device) if flat else None

    def _forward_hook(self, targets: list[tuple[Probe, str]]) -> Callable[..., None]:
        # the probes that read the module's input as well (they override `on_input`)
        inputs = {p for p, _ in targets if type(p).on_input is not Probe.on_input}

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            rec = self._rec
            if rec is None or self._in_backward or rec.error is not None:
                return  # (in backward: activation checkpointing runs the forward again; each forward counts once)
            t = first_tensor(output)
            try:
                for probe, name in targets:
                    if probe in rec.moments or probe in self._tracers:
                        if probe in inputs and (x := first_tensor(args)) is not None:
                            probe.on_input(rec, name, x)
                        if t is not None:
                            probe.on_output(rec, name, t)
            except Exception as error:  # raised on every rank after the reduction
                rec.error = error

        return hook

    # ------------------------------------------------------------------ a step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pass_batch():
            return
        step = logging_step(trainer, pl_module)
        if step < self._wake:  # asleep: nothing recorded before `_wake`
            if pl_module.automatic_optimization:  # (one optimizer step a batch at most)
                self._skip = self._wake - step - 1
            return
        if step != self._step:
            self._begin(trainer, pl_module, step)
        self._in_backward = False
        rec = self._rec
        if rec is not None and not self._handles and (rec.moments or not self._eager.needed):
            # hooks exist only during recorded (or traced) steps: a module with a forward hook takes nn.Module's
            # slow call path; a compiled model runs them eagerly, its graphs untouched (and traces no activation)
            self._handles = [module.register_forward_hook(hook) for module, hook in self._hooks]
            self._eager.enter()
        self._sleep(rec is None)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Plans a new step: what each probe records on it (and until when to sleep if nothing)."""
        if self._first is None:
            self._first = step
        if not pl_module.automatic_optimization:  # measure the optimizer steps per batch
            if self._origin is None:
                self._origin = (step, trainer.global_step)
            elif step > self._origin[0]:
                self._rate = (trainer.global_step - self._origin[1]) / (step - self._origin[0]) or None
        self._step = step
        first, last = self._first, last_step(trainer, pl_module, step, self._rate)
        self._last_step = last
        moments = {
            p: m
            for p, c in self._cadences.items()
            if (m := c.moment(step, first, last, p.has_histograms)).active and p.watching(trainer)
        }
        for p in moments:
            p.start_states(trainer.strategy.root_device)
        tracing = self._trace is not None
        self._rec = Recording(step, trainer, pl_module, moments, tracing) if moments or tracing else None
        # whose step methods run: the probes that record and, on every step when it traces, those that trace
        self._called = [p for p in self.probes if p in moments or p in self._tracers] if tracing else list(moments)
        self._wake = -1 if self._rec is not None else self._next_step(step + 1)

    def _next_step(self, step: int) -> int:
        """The first step >= ``step`` on which some probe may record."""
        candidates = [c.next_step(step, self._last_step) for c in self._cadences.values()]
        if self._origin is not None and self._rate is None:
            candidates.append(self._origin[0] + 1)  # manual optimization: measure the steps per batch
        return min(candidates, default=step)

    def _sleep(self, asleep: bool) -> None:
        if asleep != self._asleep:
            self._asleep = asleep
            shadow_step_hooks(self, asleep)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._in_backward = True
        rec = self._rec
        if rec is not None:
            for p in self._called:
                rec.guard(p.before_backward)(rec)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_backward = False

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        rec = self._rec
        if rec is not None:
            for p in self._called:
                rec.guard(p.before_optimizer_step)(rec, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        rec = self._rec
        if rec is None or not step_ends(trainer, pl_module, batch_idx):
            return
        for p in self._called:
            rec.guard(p.end_step)(rec, outputs)
        self._rec = None
        if self._trace is not None:
            self._trace.write(rec.step, rec.traced)
        if self._trace is None or self._eager.needed:
            self._remove_handles()  # (a tracing recorder keeps its hooks from step to step)
            self._wake = self._next_step(rec.step + 1)
            self._sleep(True)
        if rec.moments:
            self._finish(rec)

    def _finish(self, rec: Recording) -> None:
        """Reduces the step (every rank), lets the probes read it, asks the judges and writes (rank zero)."""
        trainer = rec.trainer
        tags: list[str] = []
        histogram_tags: dict[str, int] = {}
        for p, moment in rec.moments.items():
            t, h = p.tags(moment)
            tags += t
            histogram_tags.update(dict.fromkeys(h, p.bins))
        pending, self._pending = self._pending, None
        reducer = None
        if trainer.world_size > 1:
            reducer = lambda t, op: trainer.strategy.reduce(t, reduce_op=op)  # noqa: E731
        device = trainer.strategy.root_device
        alone = reducer is None and device.type == "cpu"  # (the states are where they belong: nothing to reduce)
        if alone:
            packed, bad_state = Packed.empty(device), local_states(rec.moments)
        else:  # the probes' declared states, in the same collectives as the tags
            packed, bad_state = pack_states(rec.moments, device)
        summaries, (sums, maxes) = rec.pool.reduce_with(
            tags,
            histogram_tags,
            packed,
            device,
            reducer,
            error=rec.error or pending or bad_state,
            who=f"{self.name} (step {rec.step}, rank {trainer.global_rank})",
            rank=trainer.global_rank,
        )
        if not alone:
            unpack_states(rec.moments, sums, maxes, trainer.world_size)
        readouts = {p.prefix: p.read(rec.step, m, summaries) for p, m in rec.moments.items()}
        self._last.update(readouts)
        self._write_guarded(trainer, lambda: self._write(trainer, rec, readouts))

    def _write(self, trainer: pl.Trainer, rec: Recording, readouts: dict[str, Any]) -> None:
        step = rec.step
        if not trainer.is_global_zero:
            return  # (the judges and the writers on rank zero only)
        observed = {p.prefix for p, m in rec.moments.items() if m.scalars}
        if self._trace is not None and observed:
            readouts = {**readouts, "trace": self._trace.read()}
            observed.add("trace")
        findings = []
        view = Readouts(readouts)  # one read-only view for all the judges of the step
        for part, judge in self._judges():
            if all(r in observed for r in judge.prefixes):
                findings += [(part, f) for f in judge.observe(step, view)]
        writers = writers_for(trainer.loggers)
        scalars: list[Scalar] = []
        for p, moment in rec.moments.items():
            if moment.scalars:
                scalars += p.scalars(readouts[p.prefix])
            if moment.histograms:
                for tag, s in p.histograms(readouts[p.prefix]).items():
                    _write_histogram(writers, tag, s, step)
            if moment.histograms or (moment.scalars and not p.has_histograms):
                self._data_steps[p] = step
        for writer in writers:
            writer.scalars(scalars, step)
        for p, moment in rec.moments.items():
            if moment.figure:
                self._draw(writers, p, step)
        self._report(findings, step)

    def _draw(self, writers: list[Writer], probe: Probe, step: int) -> None:
        """Hands the probe's figure of ``step`` to the figure worker (``callbacks._background``): drawn, rendered and
        written beside training, from a snapshot of the probe's plain data taken now."""
        tag, shown = probe.figure_tag, [w for w in writers if w.figures]
        if tag is None or not shown:
            return
        self._figure_steps[probe] = step
        draw = probe.drawing()
        what = f"{tag} (step {step})"
        # TensorBoard's images are written by the figure process into event files of their own; the others'
        # writers get the rendered array
        dirs = {w: w.image_dir() for w in shown}
        image_dirs = tuple(d for d in dirs.values() if d is not None)
        others = [w for w, d in dirs.items() if d is None]
        worker().submit(
            lambda: _draw_and_write(draw, image_dirs, others, tag, step),
            lambda e: self._figure_errors.append((what, e)),
        )
        self._warn_figure_errors()

    def _flush_figures(self) -> None:
        """Waits for the figure worker (every figure given so far written), then reports a figure that failed."""
        send_scalars()  # (the per-layer lines kept for the helper)
        worker().flush()
        self._warn_figure_errors()

    def _warn_figure_errors(self) -> None:
        if not self._figure_errors or self._figure_warned:
            return
        what, error = self._figure_errors[0]
        self._figure_warned = True
        health_warning(
            f"{self.name}: the figure {what} could not be drawn or written ({type(error).__name__}: {error});"
            " training goes on, and this is reported once a fit."
        )

    def _report(self, findings: list[tuple[Part, Finding]], step: int) -> None:
        """Warns each new finding once (its monitor's ``warn``), keeps it for the end-of-fit summaries, and hands the
        step's new findings to the report."""
        new = []
        for part, f in findings:
            if f.key in part.record.warned:
                continue
            part.record.warned[f.key] = f.text
            part.record.findings.append(f)
            new.append(f)
            if part.warn:
                health_warning(f"{part.name}: {f.text}")
        if self.report is not None:
            self.report.observe(step, new)

    def _write_guarded(self, trainer: pl.Trainer, write: Callable[[], None]) -> None:
        """Runs the writing of a reduced step. With several processes an error (rank zero writes, e.g. a logger's
        network or disk) is kept instead of raised: the next reduction carries it to every rank, which all raise
        it; raised here, on one rank, it would leave the others waiting in their next collective."""
        if trainer.world_size <= 1:
            write()
            return
        try:
            write()
        except Exception as error:  # raised on every rank by the next reduction
            self._pending = self._pending or error

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for p in self.probes:
            readout = p.validated(trainer)
            if readout is not None:
                self._last[p.prefix] = readout

    # ------------------------------------------------------------------ the end of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir if self.report is not None else None  # a collective under DDP: on every rank
        if not trainer.is_global_zero:
            return
        step = max(self._step, 0)
        readouts = dict(self._last)  # each probe's last readout, and the trace's last rows
        if self._trace is not None:
            readouts["trace"] = self._trace.read()
        findings = []
        for part, judge in self._judges():
            if all(r in readouts for r in judge.prefixes):
                findings += [(part, f) for f in judge.conclude(step, Readouts(readouts))]
        self._report(findings, step)
        writers = writers_for(trainer.loggers)
        if self.report is not None:
            self.report.finish(trainer, writers, [f for part in self.parts for f in part.record.findings], log_dir)
        if not any(w.histograms or w.figures for w in writers):
            return
        step = trainer.global_step
        for p in self.probes:  # the end-of-fit figure, from the last data recorded
            last = self._data_steps.get(p, -1)
            if last >= 0 and self._figure_steps.get(p) != last:
                self._draw(writers, p, last)
        for part in self.parts:
            for p in part.probes:
                columns, rows = p.rows()
                text = part.summary_text(p, max(self._step, 0))
                for writer in writers:
                    writer.summary(f"{p.prefix}/summary", columns, rows, text, step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()
        self._flush_figures()  # before the writers close
        if stage == "fit" and trainer.is_global_zero:
            for writer in writers_for(trainer.loggers):
                writer.close()  # flushes what the writers opened themselves (TensorBoard's layer runs)
        for p in self.probes:
            p.detach()
        self._hooks = []
        pending, self._pending = self._pending, None
        if pending is not None and stage == "fit":
            raise pending  # a write of the last recorded step failed: no reduction came after it

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()
        self._flush_figures()  # the figures of the steps before it, written before Lightning closes the loggers

    def _stop(self) -> None:
        self._sleep(False)
        self._remove_handles()
        for p in self.probes:
            p.stop()  # (an exception in a recorded step: a probe's interception ends here)
        self._rec = None
        self._wake, self._skip = -1, 0
        self._in_backward = False

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._eager.exit()


def _draw_and_write(
    draw: Callable[[], Figure | None], image_dirs: tuple[str, ...], writers: list[Writer], tag: str, step: int
) -> None:
    """A figure job, on the figure worker's thread: draws and renders (in the figure process when ``draw`` pickles),
    which also writes it into ``image_dirs`` (TensorBoard), then hands the array to ``writers`` and flushes each."""
    image = render(draw, image_dirs, tag, step, want_array=bool(writers))  # (H, W, 3) uint8
    if image is None:
        return
    for writer in writers:
        writer.figure(tag, image, step)
        writer.flush()  # on disk now: a run killed after this still has it


def _write_histogram(writers: list[Writer], tag: str, s: Summary, step: int) -> None:
    if s.edges is None or s.counts is None or s.count == 0:
        return
    for writer in writers:
        if writer.histograms:
            writer.histogram(tag, s, step)
