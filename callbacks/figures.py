"""Lecture-style figures: overlaid per-layer distributions, and update:data ratios over time.

The monitors draw these for TensorBoard's Images tab; scripts can call the same functions with
plain tensors. matplotlib is imported only when a figure is drawn, and only its object-oriented
API with the Agg canvas is used (no ``pyplot``, no global state, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from callbacks._stats import Pool

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Distribution",
    "describe",
    "figure_to_array",
    "plot_distributions",
    "plot_update_ratios",
    "short_labels",
    "tensor_distribution",
]


@dataclass
class Distribution:
    """One curve of :func:`plot_distributions`: a histogram and the text after its label in the legend."""

    edges: Sequence[float]  # bins + 1 edges
    counts: Sequence[float]  # bins counts
    legend: str = ""


def _fmt(value: float) -> str:
    """Short number format: fixed point for ordinary sizes, scientific for tiny or huge ones."""
    return f"{value:+.2f}" if 1e-2 <= abs(value) < 1e3 or value == 0 else f"{value:+.2e}"


def describe(t: Tensor, saturation_threshold: float | None = None) -> str:
    """Legend text of a tensor: ``mean +0.01, std 0.63, saturated 2.34%`` (saturation: ``|t| > threshold``).

    Example::

        describe(torch.tensor([0.0, 0.5, 0.99, -1.0]), saturation_threshold=0.97)
        # 'mean +0.12, std 0.85, saturated 50.00%'
    """
    t = t.detach().float().reshape(-1)
    t = t[torch.isfinite(t)]
    text = f"mean {_fmt(t.mean().item())}, std {_fmt(t.std().item()).lstrip('+')}"
    if saturation_threshold is not None:
        text += f", saturated {(t.abs() > saturation_threshold).float().mean().item() * 100:.2f}%"
    return text


#: sizes for TensorBoard's Images tab, which shows an image about 340 px wide unless "actual size" is ticked:
#: a figure 680 px wide is halved there, so its text is drawn at twice the size a page would need
WIDTH_IN, DPI = 6.8, 100
AXES_IN = 3.6  # height of the plot itself
LEGEND_LINE_IN = 0.25  # one legend entry below the plot
FONT = {"title": 15, "label": 13, "ticks": 12, "legend": 13}  # points


def short_labels(labels: Sequence[str]) -> tuple[list[str], str]:
    """Strips the dotted prefix all ``labels`` share: ``(["0.act (Tanh)", "1.act (Tanh)"], "net.blocks.")``.

    Example::

        short_labels(["net.blocks.0.act (Tanh)", "net.blocks.1.act (Tanh)"])
        # (['0.act (Tanh)', '1.act (Tanh)'], 'net.blocks.')
    """
    if len(labels) < 2:
        return list(labels), ""
    parts = [label.split(".") for label in labels]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = "".join(f"{part}." for part in parts[0][:common])
    return [label[len(prefix) :] for label in labels], prefix


def _new_figure(
    title: str, xlabel: str, ylabel: str, n_legend: int, figsize: tuple[float, float] | None = None
) -> tuple[Figure, Axes]:
    """A figure with the plot on top and room for ``n_legend`` legend lines below it (fixed margins)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legend_in = LEGEND_LINE_IN * n_legend + (0.15 if n_legend else 0.0)
    bottom_in = 0.7 + legend_in  # the x label and ticks, then the legend
    width, height = figsize if figsize is not None else (WIDTH_IN, AXES_IN + 0.45 + bottom_in)
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    # fixed margins: `tight_layout` and `legend(loc="best")` cost more than the rest of the drawing
    fig.subplots_adjust(left=0.13, right=0.97, bottom=bottom_in / height, top=1 - 0.45 / height)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=FONT["title"])
    ax.set_xlabel(xlabel, fontsize=FONT["label"])
    ax.set_ylabel(ylabel, fontsize=FONT["label"])
    ax.tick_params(labelsize=FONT["ticks"])
    ax.grid(alpha=0.3)
    return fig, ax


def _legend_below(fig: Figure, ax: Axes, n: int) -> None:
    """One legend entry a line, under the plot, left-aligned with it."""
    height = fig.get_figheight()
    top = (LEGEND_LINE_IN * n + 0.15) / height  # the legend's top edge, in figure coordinates
    ax.legend(  # the axes' legend (``ax.get_legend()``), placed in figure coordinates
        loc="upper left",
        bbox_to_anchor=(0.01, top),
        bbox_transform=fig.transFigure,
        fontsize=FONT["legend"],
        frameon=False,
        handlelength=1.5,
        borderaxespad=0.0,
        labelspacing=0.25,
    )


def plot_distributions(
    data: Mapping[str, Tensor | Distribution],
    title: str = "distribution",
    saturation_threshold: float | None = None,
    bins: int = 64,
    xlabel: str = "value",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draws every layer's distribution as a density curve, all overlaid, as in the lecture.

    The legend (one line per layer, below the plot) holds each label without the dotted prefix all labels
    share, which goes to the title instead; the figure is sized to stay readable in TensorBoard's Images tab.

    Args:
        data: ``{label: tensor}`` (or ``{label: Distribution}`` with pre-binned counts); the label is
            used as-is, e.g. ``"layer 2 (Tanh)"``.
        title: the figure's title.
        saturation_threshold: for tensors: add ``saturated x%`` (share with ``|t| > threshold``) to the
            legend, e.g. ``0.97`` for tanh outputs; ``None`` leaves it out.
        bins: at most this many equal bins for a tensor (see :func:`tensor_distribution`).
        xlabel: label of the x axis.
        figsize: size in inches; default: 6.8 wide, tall enough for the plot and one legend line per layer.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas): ``fig.savefig("x.png")`` works without ``pyplot``.

    Example::

        h = torch.tanh(torch.randn(32, 200) * 2)
        fig = plot_distributions({"layer 1 (Tanh)": h}, "activation distribution", saturation_threshold=0.97)
        fig.savefig("activations.png")
    """
    labels, prefix = short_labels(list(data))
    if prefix:
        title = f"{title}: {prefix}*"
    fig, ax = _new_figure(title, xlabel, "density", len(data), figsize)
    for label, item in zip(labels, data.values(), strict=True):
        if isinstance(item, Tensor):
            dist = tensor_distribution(item, bins)
            dist.legend = describe(item, saturation_threshold)
        else:
            dist = item
        edges = torch.tensor(list(dist.edges), dtype=torch.float64)
        counts = torch.tensor(list(dist.counts), dtype=torch.float64)
        widths = edges[1:] - edges[:-1]
        density = counts / (counts.sum().clamp(min=1) * widths)
        centers = (edges[1:] + edges[:-1]) / 2
        ax.plot(centers.numpy(), density.numpy(), label=f"{label}: {dist.legend}" if dist.legend else label)
    if data:
        _legend_below(fig, ax, len(data))
    return fig


def tensor_distribution(t: Tensor, bins: int = 64) -> Distribution:
    """Bins a tensor's finite values into at most ``bins`` equal bins (on its device), as the monitors do: the
    edges are multiples of the width, the first at or below the min, the last above the max.

    Example::

        dist = tensor_distribution(torch.tensor([0.0, 0.25, 1.0]), bins=2)
        # Distribution(edges=[0.0, 0.501953125, 1.00390625], counts=[2.0, 1.0], legend='')
    """
    pool = Pool()
    pool.add("t", t, histogram=True)
    summary = pool.reduce(["t"], {"t": bins}, t.device, None)["t"]
    return Distribution(summary.edges or [0.0, 1.0], summary.counts or [0.0])


def plot_update_ratios(
    history: Mapping[str, Sequence[float]],
    steps: Sequence[int] | None = None,
    guide: float | None = -3.0,
    title: str = "update:data ratio (log10)",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draws ``log10(update std / data std)`` per parameter over time, with a guide line at ``guide``.

    Args:
        history: ``{parameter name: [log10 ratio per logged step]}``.
        steps: the x values (optimizer steps) shared by all curves; default ``0, 1, 2, ...``. A curve
            shorter than ``steps`` is drawn against its last steps (it started later).
        guide: height of the dashed guide line ("about 1e-3 is healthy"); ``None`` for none.
        title: the figure's title (the dotted prefix all names share is added to it).
        figsize: size in inches; default: 6.8 wide, tall enough for the plot and one legend line per name.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas).

    Example::

        ud = {"layer1.weight": [-2.1, -2.6, -3.0], "layer2.weight": [-1.5, -2.2, -2.9]}
        plot_update_ratios(ud, steps=[0, 100, 200]).savefig("update_ratio.png")
    """
    labels, prefix = short_labels(list(history))
    if prefix:
        title = f"{title}: {prefix}*"
    fig, ax = _new_figure(title, "step", "log10(update / data)", len(history) + (guide is not None), figsize)
    for label, values in zip(labels, history.values(), strict=True):
        xs = list(steps)[-len(values) :] if steps is not None and values else list(range(len(values)))
        ax.plot(xs, list(values), label=label)
    if guide is not None:
        ax.axhline(guide, color="k", linestyle="--", linewidth=1, label=f"guide: {guide:g} (about 1e{guide:g})")
    if history or guide is not None:
        _legend_below(fig, ax, len(history) + (guide is not None))
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Renders a figure to an ``(H, W, 3)`` uint8 array, e.g. for ``SummaryWriter.add_image(..., dataformats="HWC")``.

    Example::

        img = figure_to_array(plot_update_ratios({"w": [-3.0, -2.5]}))
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
