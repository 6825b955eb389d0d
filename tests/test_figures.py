"""``callbacks.figures``: legends readable in TensorBoard's Images tab, densities that integrate to one, labels."""

import numpy as np
import pytest
import torch

from callbacks.figures import (
    DPI,
    WIDTH_IN,
    Distribution,
    figure_to_array,
    plot_distributions,
    plot_update_ratios,
    short_labels,
)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (["net.blocks.0.act (Tanh)", "net.blocks.1.act (Tanh)"], (["0.act (Tanh)", "1.act (Tanh)"], "net.blocks.")),
        (["net.head.weight", "net.blocks.0.linear.weight"], (["head.weight", "blocks.0.linear.weight"], "net.")),
        (["a.weight", "b.weight"], (["a.weight", "b.weight"], "")),
        (["net.act"], (["net.act"], "")),  # one label keeps its name
        (["x.y", "x.y.z"], (["y", "y.z"], "x.")),  # never strips a whole label
    ],
)
def test_short_labels(labels, expected):
    assert short_labels(labels) == expected


def test_distributions_legend_below_the_plot_readable_at_half_size():
    layers = {f"net.blocks.{i}.act (Tanh)": torch.tanh(torch.randn(64, 50) * (i + 1)) for i in range(5)}
    fig = plot_distributions(layers, "activation distribution (step 7)", saturation_threshold=0.97)
    image = figure_to_array(fig)
    assert image.shape[1] == round(WIDTH_IN * DPI)  # 680 px: TensorBoard shows it about halved
    ax = fig.axes[0]
    assert ax.get_title() == "activation distribution (step 7): net.blocks.*"
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [t.split(":")[0] for t in texts] == [f"{i}.act (Tanh)" for i in range(5)]  # forward order
    h = layers["net.blocks.0.act (Tanh)"]
    assert texts[0].endswith(f"saturated {(h.abs() > 0.97).float().mean().item() * 100:.2f}%")
    # legend text at least 13 pt (18 px at 100 dpi: 9 px when the Images tab halves the image)
    assert min(t.get_fontsize() for t in ax.get_legend().get_texts()) >= 13
    # the legend sits under the axes, inside the figure, not over the curves
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend_box.y1 < axes_box.y0 and legend_box.y0 >= 0 and legend_box.x1 <= image.shape[1]


def test_more_layers_make_a_taller_figure_of_the_same_width():
    few = figure_to_array(plot_update_ratios({f"w{i}": [-3.0] for i in range(2)}))
    many = figure_to_array(plot_update_ratios({f"w{i}": [-3.0] for i in range(8)}))
    assert few.shape[1] == many.shape[1] and many.shape[0] > few.shape[0]


def test_density_of_prebinned_counts_integrates_to_one():
    edges, counts = [0.0, 0.5, 1.0, 2.0], [2.0, 6.0, 2.0]
    fig = plot_distributions({"a": Distribution(edges, counts, "")})
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [0.25, 0.75, 1.5])
    # density = count / (total * width): 2/(10*0.5), 6/(10*0.5), 2/(10*1)
    np.testing.assert_allclose(line.get_ydata(), [0.4, 1.2, 0.2])


def test_update_ratios_guide_is_in_the_legend():
    fig = plot_update_ratios({"net.a.weight": [-2.0, -2.5], "net.b.weight": [-3.5, -3.0]}, steps=[0, 50])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["a.weight", "b.weight", "guide: -3 (about 1e-3)"]
    assert list(ax.get_lines()[-1].get_ydata()) == [-3.0, -3.0]
    assert plot_update_ratios({"w": [-3.0]}, guide=None).axes[0].get_lines()[-1].get_label() == "w"
