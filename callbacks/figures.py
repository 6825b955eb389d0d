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

from callbacks._stats import StatsBuffer

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

__all__ = [
    "Distribution",
    "describe",
    "figure_to_array",
    "plot_distributions",
    "plot_update_ratios",
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


def _new_figure(title: str, xlabel: str, ylabel: str, figsize: tuple[float, float]) -> tuple[Figure, object]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=80)
    FigureCanvasAgg(fig)
    # fixed margins: `tight_layout` and `legend(loc="best")` cost more than the rest of the drawing
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def plot_distributions(
    data: Mapping[str, Tensor | Distribution],
    title: str = "distribution",
    saturation_threshold: float | None = None,
    bins: int = 64,
    xlabel: str = "value",
    figsize: tuple[float, float] = (10.0, 4.0),
) -> Figure:
    """Draws every layer's distribution as a density curve, all overlaid, as in the lecture.

    Args:
        data: ``{label: tensor}`` (or ``{label: Distribution}`` with pre-binned counts); the label is
            used as-is, e.g. ``"layer 2 (Tanh)"``.
        title: the figure's title.
        saturation_threshold: for tensors: add ``saturated x%`` (share with ``|t| > threshold``) to the
            legend, e.g. ``0.97`` for tanh outputs; ``None`` leaves it out.
        bins: number of equal bins between a tensor's min and max.
        xlabel: label of the x axis.
        figsize: size in inches.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas): ``fig.savefig("x.png")`` works without ``pyplot``.

    Example::

        h = torch.tanh(torch.randn(32, 200) * 2)
        fig = plot_distributions({"layer 1 (Tanh)": h}, "activation distribution", saturation_threshold=0.97)
        fig.savefig("activations.png")
    """
    fig, ax = _new_figure(title, xlabel, "density", figsize)
    for label, item in data.items():
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
        ax.legend(fontsize="small", loc="upper right")
    return fig


def tensor_distribution(t: Tensor, bins: int = 64) -> Distribution:
    """Bins a tensor's finite values into ``bins`` equal bins between its min and max (on its device).

    Example::

        dist = tensor_distribution(torch.tensor([0.0, 0.25, 1.0]), bins=2)
        # Distribution(edges=[0.0, 0.5, 1.0], counts=[2.0, 1.0], legend='')
    """
    buffer = StatsBuffer()
    buffer.add("t", t, keep=True)
    summary = buffer.reduce(["t"], t.device, None, histograms=True, bins=bins)["t"]
    return Distribution(summary.edges or [0.0, 1.0], summary.counts or [0.0])


def plot_update_ratios(
    history: Mapping[str, Sequence[float]],
    steps: Sequence[int] | None = None,
    guide: float | None = -3.0,
    title: str = "update:data ratio (log10)",
    figsize: tuple[float, float] = (10.0, 4.0),
) -> Figure:
    """Draws ``log10(update std / data std)`` per parameter over time, with a guide line at ``guide``.

    Args:
        history: ``{parameter name: [log10 ratio per logged step]}``.
        steps: the x values (optimizer steps) shared by all curves; default ``0, 1, 2, ...``. A curve
            shorter than ``steps`` is drawn against its last steps (it started later).
        guide: height of the dashed guide line ("about 1e-3 is healthy"); ``None`` for none.
        title: the figure's title.
        figsize: size in inches.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas).

    Example::

        ud = {"layer1.weight": [-2.1, -2.6, -3.0], "layer2.weight": [-1.5, -2.2, -2.9]}
        plot_update_ratios(ud, steps=[0, 100, 200]).savefig("update_ratio.png")
    """
    fig, ax = _new_figure(title, "step", "log10(update std / data std)", figsize)
    for name, values in history.items():
        xs = list(steps)[-len(values) :] if steps is not None and values else list(range(len(values)))
        ax.plot(xs, list(values), label=name)
    if guide is not None:
        ax.axhline(guide, color="k", linestyle="--", linewidth=1)
    if history:
        ax.legend(fontsize="small", loc="upper right")
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
