"""One writer per logger kind behind one small interface, so the monitors never branch on logger types.

The recorder hands every writer the same things: scalars (each with the dashboard chart and layer it belongs
to), a histogram (bin counts already computed on the device), a figure (an RGB array), the end-of-fit summary (a
table plus its markdown). Figures arrive from the figure worker's thread (``callbacks._background``), everything
else from the training thread; TensorBoard's figures and per-layer runs are written by the figure process itself
(``Writer.image_dir``, ``callbacks._background.write_scalars``). Each writer shows what its logger can show and
drops the rest:

============================  =======  ==========  =======  =====================  ==========
logger                        scalars  histograms  figures  summary                charts
============================  =======  ==========  =======  =====================  ==========
``TensorBoardLogger``         yes      yes (raw)   yes      Text tab (markdown)    custom scalars
``WandbLogger``               yes      yes         yes      ``wandb.Table``        (W&B groups by prefix)
``MLFlowLogger``              yes      no          yes      ``summary/*.md`` file  no
any other (``CSVLogger``...)  yes      no          no       no                     no
============================  =======  ==========  =======  =====================  ==========

MLflow has no histogram type; its figures (drawn from the same histograms) show the distributions.
``wandb`` and ``mlflow`` are imported only inside their writers, which exist only when the user's logger is one
of them: this package depends on Lightning and PyTorch only.

The writers are shared by all monitors writing to one logger (one writer per logger object), so the
TensorBoard writer can merge every monitor's charts into one custom-scalars layout, rewritten when it grows.
"""

from __future__ import annotations

import functools
import os
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from callbacks._internals import fast_checksums, logger_prefix, write_scalars_event
from callbacks._stats import Summary
from callbacks.probes.base import Chart, Scalar

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Writer", "writers_for"]

#: the dashboard's one category; its first charts: every metric named like a loss (``train/loss``, ``val/loss``,
#: ``train_loss_epoch``) and like a learning rate (``train/lr``, LearningRateMonitor's ``lr-SGD``)
CATEGORY = "training health"
LOSS_CHART, LOSS_PATTERN = "loss", r"^(.*[/_])?loss([/_].*)?$"
LR_CHART, LR_PATTERN = "learning rate", r"^(.*[/_])?lr([-/_].*)?$"
#: the TensorBoard run of the figures, ``{log_dir}/figures``: event files the figure process writes (the PNG and
#: the records' checksums off the training process); TensorBoard follows one growing event file per run folder
FIGURES_RUN = "figures"
#: the tag of the health report (TensorBoard's Text tab, a W&B table)
REPORT_TAG = "health/report"


class Writer:
    """Writes a monitor's data to one logger; this base writes scalars through ``log_metrics`` only.

    Attributes:
        histograms: whether :meth:`histogram` shows anything (the monitors skip the binning otherwise).
        figures: whether :meth:`figure` shows anything (the monitors skip the drawing otherwise).
    """

    histograms = False
    figures = False

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def scalars(self, scalars: Sequence[Scalar], step: int) -> None:
        """Writes each scalar's value under its tag at ``step``."""
        if scalars:
            self.logger.log_metrics({s.tag: s.value for s in scalars}, step=step)

    def histogram(self, tag: str, s: Summary, step: int) -> None:
        """Writes the histogram ``s.edges``/``s.counts`` (with its min, max, count, sums) at ``step``."""

    def figure(self, tag: str, image: np.ndarray, step: int) -> None:
        """Writes an ``(H, W, 3)`` uint8 image at ``step``."""

    def image_dir(self) -> str | None:
        """A folder into which the figure process writes this logger's figures as TensorBoard event files of their
        own (``callbacks._background``), instead of :meth:`figure`; None (the default): :meth:`figure` is called."""
        return None

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        """Writes the end-of-fit summary: a table (``columns``, ``rows``) and the same as markdown ``text``."""

    def report(self, text: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Writes the fit's health report: markdown ``text``, and its findings as a table (``columns``, ``rows``)."""

    def flush(self) -> None:
        """Puts what it wrote on disk now (called by the figure worker after each figure; any thread)."""

    def close(self) -> None:
        """Flushes what it opened of its own (the logger's files are the logger's)."""


class TensorBoardWriter(Writer):
    """Scalars as one event per step, raw histograms, images, the summary as text, and a custom-scalars dashboard.

    The dashboard (Custom Scalars) has one chart per question: the loss, the learning rate, then one statistic of
    every layer per chart (saturation, dead units, activation std, gradient std, grad:data, update:data). Each
    layer's line is written under the chart's series tag into a run of its own, ``{log_dir}/layers/{layer}``, so
    TensorBoard gives every layer its own colour and lists it by name; a guide (``-3`` on the update:data chart)
    is a run of its own too. The layer's scalars keep their full tags in the main run as well. The figures are a run of
    their own too, ``{log_dir}/figures``, written by the figure process (``callbacks._background``).
    """

    histograms = figures = True

    def __init__(self, logger: TensorBoardLogger) -> None:
        super().__init__(logger)
        self._charts: dict[str, Chart] = {}  # title -> chart, shared by all monitors on this logger
        self._layout_written: list[str] = []
        self._written: set[str] = set()  # the layer runs written through the figure process
        self._dir: str | None = None  # the logger's log_dir (a property that reads the file system)

    @property
    def _writer(self) -> Any:
        return self.logger.experiment

    def scalars(self, scalars: Sequence[Scalar], step: int) -> None:
        if not scalars:
            return
        metrics = {s.tag: s.value for s in scalars}
        fast_checksums(self._writer)  # (the same bytes, checksummed in C where google-crc32c's C code is installed)
        if logger_prefix(self.logger) != "" or not write_scalars_event(self._writer, metrics, step):
            self.logger.log_metrics(metrics, step=step)
        runs: dict[str, dict[str, float]] = {}
        for s in scalars:
            if s.chart is None or s.layer is None:
                continue
            self._charts.setdefault(s.chart.title, s.chart)
            runs.setdefault(_run_name(s.layer), {})[s.chart.series] = s.value
            if s.chart.guide is not None:
                runs.setdefault(f"guide 1e{s.chart.guide:g}", {})[s.chart.series] = s.chart.guide
        if runs:  # written by the figure process (callbacks._background): off this process's GIL
            from callbacks._background import write_scalars

            log_dir = self._log_dir()
            write_scalars({os.path.join(log_dir, run): values for run, values in runs.items()}, step)
            self._written.update(runs)
        self._write_layout()

    def histogram(self, tag: str, s: Summary, step: int) -> None:
        # TensorBoard reads right bucket limits; a leading empty bucket keeps the left edge
        self._writer.add_histogram_raw(
            tag,
            min=s.min,
            max=s.max,
            num=s.count,
            sum=s.sum,
            sum_squares=s.sum_squares,
            bucket_limits=list(s.edges),
            bucket_counts=[0.0, *s.counts],
            global_step=step,
        )

    def image_dir(self) -> str | None:  # (so `figure` is never called)
        return os.path.join(self._log_dir(), FIGURES_RUN)

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)

    def report(self, text: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._writer.add_text(REPORT_TAG, text, global_step=step)

    def _log_dir(self) -> str:
        if self._dir is None:
            self._dir = self.logger.log_dir
        return self._dir

    def close(self) -> None:
        from callbacks._background import close_runs

        # the figure process's writers of this run: its figures and its layers' lines
        log_dir = self._log_dir()
        close_runs([os.path.join(log_dir, run) for run in (FIGURES_RUN, *sorted(self._written))])
        self._written, self._dir = set(), None
        self._writer.flush()

    def _write_layout(self) -> None:
        if self._layout_written and len(self._charts) + 2 == len(self._layout_written):
            return  # no new chart since the layout was written (the loss and lr charts come first)
        layout = self.layout()
        titles = list(layout[CATEGORY])
        if titles == self._layout_written:
            return
        # the custom-scalars plugin serves the layout a run wrote last, so a grown layout is written again whole
        self._writer.add_custom_scalars(layout)
        self._layout_written = titles

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The layout in ``SummaryWriter.add_custom_scalars`` form: ``{category: {title: ["Multiline", [regex]]}}``."""
        charts: dict[str, list[Any]] = {
            LOSS_CHART: ["Multiline", [LOSS_PATTERN]],
            LR_CHART: ["Multiline", [LR_PATTERN]],
        }
        # numbered charts first, by number; the others after them as first written (a stable sort keeps that order)
        for c in sorted(self._charts.values(), key=lambda c: (c.order is None, c.order or 0)):
            charts[c.title] = ["Multiline", [f"^{re.escape(c.series)}$"]]
        return {CATEGORY: charts}


@functools.lru_cache(maxsize=4096)
def _run_name(layer: str) -> str:
    """The run folder of a layer's lines: ``layers/{layer}`` (characters no file system takes replaced)."""
    return os.path.join("layers", re.sub(r'[\\/:*?"<>|]', "_", layer))


class WandbWriter(Writer):
    """Scalars, ``wandb.Histogram`` from the bin counts, ``wandb.Image`` figures, the summary as ``wandb.Table``.

    Every value goes with ``trainer/global_step``, the step key ``WandbLogger.log_metrics`` uses, so the
    histograms and figures line up with the scalars on W&B's step axis.
    """

    histograms = figures = True

    def _log(self, data: dict[str, Any], step: int) -> None:
        prefix = logger_prefix(self.logger)  # (None on an untested Lightning: written without it)
        key = f"{prefix}-" if prefix else ""
        self.logger.experiment.log({f"{key}{k}": v for k, v in data.items()} | {"trainer/global_step": step})

    def histogram(self, tag: str, s: Summary, step: int) -> None:
        import numpy as np
        import wandb

        hist = wandb.Histogram(np_histogram=(np.asarray(s.counts), np.asarray(s.edges)), num_bins=len(s.counts))
        self._log({tag: hist}, step)

    def figure(self, tag: str, image: np.ndarray, step: int) -> None:
        import wandb

        self._log({tag: wandb.Image(image)}, step)

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        import wandb

        self._log({tag: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step)

    def report(self, text: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.summary(REPORT_TAG, columns, rows, text, step)


class MLflowWriter(Writer):
    """Scalars, and the figures as image artifacts with their step (``MlflowClient.log_image(key=, step=)``).

    MLflow has no histogram type: the distributions reach it as the monitors' figures. The summary is a
    markdown file ``summary/{tag}.md`` among the run's artifacts.
    """

    figures = True

    def figure(self, tag: str, image: np.ndarray, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, image, key=_mlflow_key(tag), step=step)

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, text, f"summary/{_mlflow_key(tag)}.md")

    def report(self, text: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, text, "health.md")


def _mlflow_key(tag: str) -> str:
    """``activation/distribution`` -> ``activation_distribution`` (MLflow keys: alphanumerics, ``_-. /``)."""
    return re.sub(r"[^0-9A-Za-z_\-. ]", "_", tag)


_KINDS: tuple[tuple[type[Logger], type[Writer]], ...] = (
    (TensorBoardLogger, TensorBoardWriter),
    (WandbLogger, WandbWriter),
    (MLFlowLogger, MLflowWriter),
)
_WRITERS: weakref.WeakKeyDictionary[Logger, Writer] = weakref.WeakKeyDictionary()


def writer_for(logger: Logger) -> Writer:
    """The writer of ``logger`` (one per logger object, shared by every monitor that writes to it)."""
    writer = _WRITERS.get(logger)
    if writer is None:
        kind = next((w for cls, w in _KINDS if isinstance(logger, cls)), Writer)
        writer = _WRITERS[logger] = kind(logger)
    return writer


def writers_for(loggers: Iterable[Logger]) -> list[Writer]:
    """One writer per logger, in the Trainer's order."""
    return [writer_for(lg) for lg in loggers]
