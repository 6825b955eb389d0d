"""One writer per logger kind behind one small interface, so the monitors never branch on logger types.

A monitor hands every writer the same things: scalars, a histogram (bin counts already computed on the
device), a figure (an RGB array), the end-of-fit summary (a table plus its markdown), and the charts its
scalars belong on. Each writer shows what its logger can show and drops the rest:

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

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from callbacks._stats import Summary

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Chart", "Writer", "writers_for"]

#: the dashboard's one category, and the chart holding every metric named like a loss (``train/loss``, ``val/loss``)
CATEGORY = "training health"
LOSS_CHART = "loss"


@dataclass
class Chart:
    """One multi-line chart of the custom-scalars layout: ``tags`` overlaid, in this order (forward order).

    ``order`` sorts the charts of the dashboard (loss first, then the activations, gradients, updates).
    ``regex`` charts match their tag patterns as regular expressions (the loss chart); the others list
    exact tags.
    """

    title: str
    order: int
    tags: list[str] = field(default_factory=list)
    regex: bool = False


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

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """Writes ``{tag: value}`` at ``step``."""
        self.logger.log_metrics(dict(metrics), step=step)

    def histogram(self, tag: str, s: Summary, step: int) -> None:
        """Writes the histogram ``s.edges``/``s.counts`` (with its min, max, count, sums) at ``step``."""

    def figure(self, tag: str, image: np.ndarray, step: int) -> None:
        """Writes an ``(H, W, 3)`` uint8 image at ``step``."""

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        """Writes the end-of-fit summary: a table (``columns``, ``rows``) and the same as markdown ``text``."""

    def charts(self, charts: Iterable[Chart], step: int) -> None:
        """Adds charts (merged with those of other monitors on the same logger) to the dashboard's layout."""


class TensorBoardWriter(Writer):
    """Scalars as one event per call, raw histograms, images, the summary as text, a custom-scalars layout."""

    histograms = figures = True

    def __init__(self, logger: TensorBoardLogger) -> None:
        super().__init__(logger)
        self._charts: dict[str, Chart] = {}  # title -> chart, shared by all monitors on this logger
        self._layout_written: list[tuple[str, tuple[str, ...]]] = []

    @property
    def _writer(self) -> Any:
        return self.logger.experiment

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        if getattr(self.logger, "_prefix", "") or not _write_scalars_event(self._writer, metrics, step):
            self.logger.log_metrics(dict(metrics), step=step)

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

    def figure(self, tag: str, image: np.ndarray, step: int) -> None:
        self._writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def summary(self, tag: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], text: str, step: int) -> None:
        self._writer.add_text(tag, text, global_step=step)

    def charts(self, charts: Iterable[Chart], step: int) -> None:
        for chart in charts:
            mine = self._charts.setdefault(chart.title, Chart(chart.title, chart.order, regex=chart.regex))
            mine.tags += [t for t in chart.tags if t not in mine.tags]
        state = [(c.title, tuple(c.tags)) for c in self._ordered()]
        if state == self._layout_written:
            return
        # The custom-scalars plugin serves the layout a run wrote last, so a grown layout is written again whole.
        from torch.utils.tensorboard.summary import custom_scalars

        self._writer._get_file_writer().add_summary(custom_scalars(self.layout()), step)
        self._layout_written = state

    def _ordered(self) -> list[Chart]:
        return sorted(self._charts.values(), key=lambda c: c.order)

    def layout(self) -> dict[str, dict[str, list[Any]]]:
        """The layout in ``SummaryWriter.add_custom_scalars`` form: ``{category: {title: ["Multiline", [regex]]}}``."""
        charts: dict[str, list[Any]] = {}
        for c in self._ordered():
            patterns = list(c.tags) if c.regex else [f"^{re.escape(t)}$" for t in c.tags]
            charts[c.title] = ["Multiline", patterns]
        return {CATEGORY: charts}


class WandbWriter(Writer):
    """Scalars, ``wandb.Histogram`` from the bin counts, ``wandb.Image`` figures, the summary as ``wandb.Table``.

    Every value goes with ``trainer/global_step``, the step key ``WandbLogger.log_metrics`` uses, so the
    histograms and figures line up with the scalars on W&B's step axis.
    """

    histograms = figures = True

    def _log(self, data: dict[str, Any], step: int) -> None:
        key = f"{self.logger._prefix}-" if getattr(self.logger, "_prefix", "") else ""
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


def _mlflow_key(tag: str) -> str:
    """``activation/distribution`` -> ``activation_distribution`` (MLflow keys: alphanumerics, ``_-. /``)."""
    return re.sub(r"[^0-9A-Za-z_\-. ]", "_", tag)


def _write_scalars_event(writer: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Writes scalars as one TensorBoard event: the values ``add_scalar`` would write one event each for.

    A logged step of the four monitors has some 15 scalars; one ``add_scalar`` is a proto, an event and a
    queue put each, one event holding all of them costs about as much as one of those. Returns False
    (nothing written) for a writer other than torch's ``SummaryWriter`` (tensorboardX has its own protos).
    """
    from torch.utils.tensorboard import SummaryWriter

    if type(writer) is not SummaryWriter:
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto

    summary = SummaryProto(value=[SummaryProto.Value(tag=tag, simple_value=float(v)) for tag, v in metrics.items()])
    writer._get_file_writer().add_summary(summary, step)
    return True


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
