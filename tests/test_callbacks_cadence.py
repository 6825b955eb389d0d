"""When the monitors log: Lightning's steps, the optimizer-step axis with accumulation, resume, figures."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from callbacks.figures import figure_to_array, plot_distributions, plot_update_ratios
from tests.callbacks_helpers import (
    N_FEATURES,
    TanhMLP,
    fixed_loader,
    histograms,
    read_events,
    read_figures,
    saturating_batch,
    scalars,
    trainer,
)


def test_same_steps_as_lightning_nothing_during_validation(tmp_path):
    """Scalars on Lightning's own logging steps; validation and the sanity check never leak into them."""
    x = saturating_batch(16)
    val = fixed_loader(torch.full((5, N_FEATURES), 0.1), 2)  # a different batch size and values
    monitors = [
        ActivationMonitor(histogram_every_n_steps=6),
        GradientMonitor(),
        ParameterMonitor(),
        UpdateRatioMonitor(),
    ]
    t = trainer(tmp_path, monitors, log_every_n_steps=3, max_epochs=2, val_check_interval=4, num_sanity_val_steps=2)
    t.fit(TanhMLP(), fixed_loader(x, 8), val)
    acc = read_events(t.logger.log_dir)
    lightning_steps = sorted(scalars(acc, "train/loss"))
    assert lightning_steps == [2, 5, 8, 11, 14]
    # and step 0, the picture at initialisation (before the first update)
    for tag in ("activation/act/std", "activation_grad/act/std", "param_grad/head.weight/std"):
        assert sorted(scalars(acc, tag)) == [0, *lightning_steps], tag
    assert sorted(scalars(acc, "update_ratio/head.weight")) == [0, *lightning_steps]
    # histograms at step 0, every 6 steps and at the final step (15); counts are training batches only
    hist = histograms(acc, "activation/act")
    assert sorted(hist) == [0, 5, 11, 15]
    assert all(h.num == x.numel() for h in hist.values())
    assert all(v == pytest.approx(0.25) for v in scalars(acc, "activation/act/saturation").values())


def test_gradient_accumulation_logs_on_optimizer_steps(tmp_path):
    x = saturating_batch(16)
    monitors = [
        ActivationMonitor(histogram_every_n_steps=2),
        GradientMonitor(),
        ParameterMonitor(),
        UpdateRatioMonitor(),
    ]
    t = trainer(tmp_path, monitors, log_every_n_steps=2, accumulate_grad_batches=2)
    t.fit(TanhMLP(), fixed_loader(x, 8))  # 8 micro-batches: 4 optimizer steps
    assert t.global_step == 4
    acc = read_events(t.logger.log_dir)
    assert sorted(scalars(acc, "train/loss")) == [1, 3]
    for tag in ("activation/act/mean", "activation_grad/act/std", "param_grad/head.weight/std"):
        assert sorted(scalars(acc, tag)) == [0, 1, 3], tag
    assert sorted(scalars(acc, "update_ratio/head.weight")) == [0, 1, 3]
    # the histogram of a logged step pools both of its micro-batches (step 0's too)
    hist = histograms(acc, "activation/act")
    assert sorted(hist) == [0, 1, 3]
    assert hist[3].num == hist[0].num == 2 * x.numel()
    assert histograms(acc, "activation_grad/act")[3].num == 2 * x.numel()


def test_resume_continues_update_ratio_history(tmp_path):
    x = saturating_batch(16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    first = UpdateRatioMonitor(every_n_steps=2)
    t = trainer(tmp_path, [first, ckpt], enable_checkpointing=True, max_steps=4)
    t.fit(TanhMLP(), fixed_loader(x, 8))
    assert first.steps == [0, 1, 3]

    second = UpdateRatioMonitor(every_n_steps=2)
    t = trainer(tmp_path, [second], max_steps=8)
    t.fit(TanhMLP(), fixed_loader(x, 8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.steps == [0, 1, 3, 5, 7]  # a resumed fit has no step 0 of its own
    assert second.history["head.weight"][:3] == first.history["head.weight"]
    assert all(math.isfinite(v) for v in second.history["head.weight"])


def test_state_dict_round_trip():
    state = {"warned": {"lr/high": "too high"}, "streaks": {"lr/low": 2}}
    state |= {"steps": [9, 19], "history": {"w": [-3.0, -2.5]}, "lrs": {"w": [0.1, 0.1]}}
    monitor = UpdateRatioMonitor()
    monitor.load_state_dict(state)
    assert (monitor.steps, monitor.history) == ([9, 19], {"w": [-3.0, -2.5]})
    other = UpdateRatioMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.state_dict() == {**state, "findings": []}  # an old state without findings loads with none
    assert UpdateRatioMonitor(params=["a*"]).state_key != UpdateRatioMonitor().state_key


def test_scalars_off_histograms_only(tmp_path):
    t = trainer(tmp_path, [ActivationMonitor(every_n_steps=0, histogram_every_n_steps=2)], max_steps=4)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 4))
    tags = read_events(t.logger.log_dir).Tags()
    assert not any(tag.startswith("activation/") for tag in tags["scalars"])
    assert sorted(histograms(read_events(t.logger.log_dir), "activation/act")) == [0, 1, 3]


def test_figures_from_tensors():
    h1 = torch.tanh(saturating_batch(64))
    fig = plot_distributions({"layer 1 (Tanh)": h1, "layer 2 (Tanh)": h1 * 0.5}, saturation_threshold=0.97)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("layer 1 (Tanh): mean") and labels[0].endswith("saturated 25.00%")
    assert "std" in labels[1] and labels[1].endswith("saturated 0.00%")
    image = figure_to_array(fig)
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3

    fig = plot_update_ratios({"w1": [-2.0, -2.5, -3.0], "w2": [-3.5, -3.2]}, steps=[10, 20, 30])
    ax = fig.axes[0]
    guide = [line for line in ax.get_lines() if list(line.get_ydata()) == [-3.0, -3.0]]
    assert len(guide) == 1
    assert list(ax.get_lines()[1].get_xdata()) == [20, 30]  # the shorter curve started later


def test_figures_at_initialisation_about_five_over_the_fit_and_at_the_end(tmp_path):
    monitors = [ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4), UpdateRatioMonitor(every_n_steps=2)]
    t = trainer(tmp_path, monitors, max_steps=40, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 40))
    acc = read_figures(t.logger.log_dir)
    # step 0 (the picture at initialisation, before any update), then every 8th step: 10 histogram steps / 5
    assert [e.step for e in acc.Images("activation/distribution")] == [0, 7, 15, 23, 31, 39]
    # the update-ratio history has no histograms: its figures fall on scalar steps (20 of them, every 4th)
    assert [e.step for e in acc.Images("update_ratio/history")] == [0, 7, 15, 23, 31, 39]


def test_figure_every_n_steps_zero_first_and_end_only(tmp_path):
    monitor = ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4, figure_every_n_steps=0)
    t = trainer(tmp_path, [monitor], max_steps=14, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 14))
    assert [e.step for e in read_figures(t.logger.log_dir).Images("activation/distribution")] == [0, 13]
