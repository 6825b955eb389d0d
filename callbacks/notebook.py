"""The monitors in a notebook: their figures and the health report shown inline, where the student works.

In a script the monitors' figures go to a logger (TensorBoard's Images tab, W&B, MLflow) and the report to
``health.md``. In Jupyter or Colab, after ``trainer.fit``:

- :func:`figures` draws each monitor's figure from the last data it recorded (``activation/distribution``,
  ``activation_grad/distribution``, ``param_grad/distribution``, ``update_ratio/history``) and returns them as
  matplotlib figures, which a notebook shows as images; :class:`InlineFigure` wraps one as a PNG of a page's width;
- :func:`show` displays them and the fit's health report (a ``Report`` renders itself as markdown).

Only the probes' public ``draw`` is used: what a notebook shows is what TensorBoard's Images tab shows. IPython is
imported by :func:`show` alone, so the module works (and is tested) without a notebook.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback

from callbacks._recorder import Recorder

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["InlineFigure", "figures", "show"]

#: the width a figure is shown at, in CSS pixels: the figures are drawn 680 px wide with text for half that
#: size (TensorBoard's Images tab), so two thirds of it keeps the text at a page's size
INLINE_WIDTH = 460


def _recorder(callback: Callback) -> Recorder:
    """The recorder that drives ``callback``'s monitors: the monitor itself, or a group's (HealthMonitor's) one."""
    recorder = callback if isinstance(callback, Recorder) else getattr(callback, "recorder", None)
    if not isinstance(recorder, Recorder):
        raise ValueError(
            "Expected a monitor (ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor), a "
            f"CallbackGroup of monitors or a HealthMonitor, but got {type(callback).__name__}."
        )
    return recorder


def figures(callback: Callback) -> dict[str, Figure]:
    """The figures of the monitors in ``callback``, drawn from the last data each recorded (the end of the last
    fit; after a fit of one step: the net at initialisation).

    Args:
        callback: a monitor, a ``CallbackGroup`` of monitors, or a ``HealthMonitor``, after ``trainer.fit``.

    Returns:
        The figure tag (``"activation/distribution"``, ...) -> a ``matplotlib.figure.Figure``, in the monitors'
        order; empty before a fit, or when no step was recorded with histograms.

    Raises:
        ValueError: when ``callback`` has no monitors.

    Example::

        monitor = HealthMonitor()
        trainer = Trainer(max_steps=1_000, callbacks=[monitor])
        trainer.fit(model, datamodule=dm)
        display(InlineFigure(figures(monitor)["activation/distribution"]))  # in a notebook
    """
    drawn: dict[str, Figure] = {}
    for probe in _recorder(callback).probes:
        if probe.figure_tag is None:
            continue
        fig = probe.draw()
        if fig is not None:
            drawn[probe.figure_tag] = fig
    return drawn


class InlineFigure:
    """A figure as a notebook shows it: a PNG at ``width`` CSS pixels (its pixels are kept for sharp screens).

    Args:
        figure: a ``matplotlib.figure.Figure`` (e.g. one of :func:`figures`).
        width: the width it is shown at, in CSS pixels.
    """

    def __init__(self, figure: Figure, width: int = INLINE_WIDTH) -> None:
        self.figure = figure
        self.width = width

    def _repr_png_(self) -> tuple[bytes, dict[str, Any]]:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue(), {"width": self.width}

    def __repr__(self) -> str:
        title = self.figure.axes[0].get_title() if self.figure.axes else ""
        return f"<figure {title!r}>"


def show(callback: Callback, report: bool = True, width: int = INLINE_WIDTH) -> None:
    """Displays the figures of :func:`figures` inline, then the fit's health report (with a ``HealthMonitor``).

    Args:
        callback: a monitor, a ``CallbackGroup`` of monitors, or a ``HealthMonitor``, after ``trainer.fit``.
        report: also display the health report (a ``HealthMonitor``'s; other monitors have none).
        width: each figure's width, in CSS pixels.

    Raises:
        ValueError: when ``callback`` has no monitors.
    """
    from IPython.display import display

    for fig in figures(callback).values():
        display(InlineFigure(fig, width))
    found = getattr(callback, "report", None) if report else None
    if found is not None:
        display(found)
