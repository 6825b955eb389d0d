"""The four monitors against independently computed statistics, on a tanh MLP and on Lightning's BoringModel."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import (
    N_FEATURES,
    Recorder,
    TanhMLP,
    fixed_loader,
    histograms,
    read_events,
    read_figures,
    saturating_batch,
    scalars,
    trainer,
)

LR = 0.1


def all_monitors(**kwargs):
    return [
        ActivationMonitor(**kwargs),
        GradientMonitor(**kwargs),
        ParameterMonitor(**kwargs),
        UpdateRatioMonitor(**{k: v for k, v in kwargs.items() if k == "every_n_steps"}),
    ]


def test_tanh_mlp_values_match_reference(tmp_path):
    x = saturating_batch(16)
    recorder = Recorder(LR)
    t = trainer(tmp_path, [*all_monitors(every_n_steps=2, histogram_every_n_steps=4), recorder], log_every_n_steps=2)
    t.fit(TanhMLP(LR), fixed_loader(x, 8))
    acc = read_events(t.logger.log_dir)
    ref = recorder.rows

    sat = scalars(acc, "activation/act/saturation")
    assert sorted(sat) == [0, 1, 3, 5, 7]  # step 0: the picture at initialisation, before any update
    for step, value in sat.items():
        assert value == pytest.approx(0.25, abs=1e-7)  # the hand-built input: 2 of 8 columns at |x| = 3
        assert value == pytest.approx(ref[step]["act_saturation"], abs=1e-7)
    for step, value in scalars(acc, "activation/act/mean").items():
        assert value == pytest.approx(ref[step]["act_mean"], abs=1e-6)
    for step, value in scalars(acc, "activation/act/std").items():
        assert value == pytest.approx(ref[step]["act_std"], rel=1e-5)
    for step, value in scalars(acc, "activation/relu/dead").items():
        assert value == pytest.approx(ref[step]["relu_dead"], abs=1e-7)
        assert value >= 0.25
    assert "activation/act/nonfinite" not in acc.Tags()["scalars"]  # only once a NaN/inf was seen
    for step, value in scalars(acc, "activation_grad/act/std").items():
        assert value == pytest.approx(ref[step]["grad_std"], rel=1e-4)
    for name in ("hidden.weight", "head.weight"):
        for step, value in scalars(acc, f"param_grad/{name}/grad_to_data").items():
            assert value == pytest.approx(ref[step][f"{name}/grad_to_data"], rel=1e-4)
        for step, value in scalars(acc, f"param_grad/{name}/std").items():
            assert value == pytest.approx(ref[step][f"{name}/grad_std"], rel=1e-4)
        ratios = scalars(acc, f"update_ratio/{name}")
        assert sorted(ratios) == [0, 1, 3, 5, 7]
        for step, value in ratios.items():
            assert value == pytest.approx(ref[step][f"{name}/update_ratio"], abs=1e-4)

    # histograms: at step 0 and every 4 steps (3, 7); the count is the batch, the moments match the tensor, and
    # the bins hold what numpy counts between the same edges (TensorBoard's right limits; a leading empty bucket)
    hist = histograms(acc, "activation/act")
    assert sorted(hist) == [0, 3, 7]
    h = hist[3]
    expected = torch.tanh(x)
    assert h.num == x.numel() == sum(h.bucket)
    edges = list(h.bucket_limit)
    assert list(h.bucket)[1:] == np.histogram(expected.double().numpy(), bins=edges)[0].tolist()
    assert h.min == pytest.approx(expected.min().item()) and h.max == pytest.approx(expected.max().item())
    assert h.sum == pytest.approx(expected.sum().item(), abs=1e-4)
    assert h.sum_squares == pytest.approx((expected**2).sum().item(), rel=1e-5)
    assert sorted(histograms(acc, "param_grad/head.weight")) == [0, 3, 7]
    assert histograms(acc, "param/head.weight")[3].num == 3 * 2 * N_FEATURES
    # bias (1-D) and the never-called sigmoid are not monitored
    tags = acc.Tags()
    assert not any("bias" in tag for tag in tags["scalars"] + tags["histograms"])
    assert not any("unused" in tag for tag in tags["scalars"] + tags["histograms"])
    assert not tags["images"]  # the figures are a run of their own
    assert set(read_figures(t.logger.log_dir).Tags()["images"]) == {
        "activation/distribution",
        "activation_grad/distribution",
        "param_grad/distribution",
        "update_ratio/history",
    }
    assert {"activation/summary/text_summary", "update_ratio/summary/text_summary"} <= set(tags["tensors"])


def test_boring_model(tmp_path):
    """BoringModel has no activation module: watch its Linear by name; its weight by default."""
    callbacks = [
        ActivationMonitor(modules=["layer"], every_n_steps=1),
        GradientMonitor(modules=[nn.Linear], every_n_steps=1),
        ParameterMonitor(every_n_steps=1, histogram_every_n_steps=2),
        UpdateRatioMonitor(every_n_steps=1),
    ]
    grads = {}

    class Spy(Recorder):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            w = pl_module.layer.weight
            grads[trainer.global_step] = ((w.grad.std() / w.std()).item(), w.detach().clone(), w.grad.clone())

    t = trainer(tmp_path, [*callbacks, Spy(LR)], max_steps=4, limit_val_batches=0)
    t.fit(BoringModel())
    acc = read_events(t.logger.log_dir)
    assert sorted(scalars(acc, "activation/layer/mean")) == [0, 1, 2, 3]
    assert sorted(scalars(acc, "activation_grad/layer/std")) == [0, 1, 2, 3]
    assert histograms(acc, "activation/layer")[3].num == 1 * 2  # BoringModel: batch 1, 2 outputs
    ratio = scalars(acc, "param_grad/layer.weight/grad_to_data")
    for step, (expected, w, g) in grads.items():
        assert ratio[step] == pytest.approx(expected, rel=1e-4)
        # BoringModel uses SGD(lr=0.1): the update is 0.1 * grad
        assert scalars(acc, "update_ratio/layer.weight")[step] == pytest.approx(
            math.log10((0.1 * g).std().item() / w.std().item()), abs=1e-4
        )
    assert sorted(histograms(acc, "param_grad/layer.weight")) == [0, 1, 3]


def test_inplace_relu(tmp_path):
    x = saturating_batch(16)
    recorder = Recorder(LR)
    t = trainer(tmp_path, [ActivationMonitor(every_n_steps=1), GradientMonitor(every_n_steps=1), recorder])
    t.fit(TanhMLP(LR, inplace_relu=True), fixed_loader(x, 3))
    acc = read_events(t.logger.log_dir)
    for step, value in scalars(acc, "activation/relu/dead").items():
        assert value == pytest.approx(recorder.rows[step]["relu_dead"])
    assert sorted(scalars(acc, "activation_grad/relu/std")) == [0, 1, 2]
    assert histograms(acc, "activation/relu")[2].num == 16 * N_FEATURES


def test_nan_input_is_counted_not_fatal(tmp_path):
    x = saturating_batch(16)
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")  # tanh(inf) = 1: finite, so only the NaN is non-finite after tanh
    t = trainer(tmp_path, all_monitors(every_n_steps=1, histogram_every_n_steps=1), max_steps=2)
    with pytest.warns(UserWarning, match="non-finite"):
        t.fit(TanhMLP(LR), fixed_loader(x, 2))
    acc = read_events(t.logger.log_dir)
    assert scalars(acc, "activation/act/nonfinite")[0] == 1.0
    assert scalars(acc, "activation/relu/nonfinite")[0] > 0  # the Linear spreads the NaN
    h = histograms(acc, "activation/act")[0]
    assert h.num == x.numel() - 1 == sum(h.bucket)
    finite = torch.tanh(x)[torch.isfinite(torch.tanh(x))]
    assert scalars(acc, "activation/act/mean")[0] == pytest.approx(finite.mean().item(), abs=1e-6)
    assert math.isfinite(h.min) and math.isfinite(h.max)


def test_module_never_called_and_params_without_grad(tmp_path):
    model = TanhMLP(LR)
    model.hidden.weight.requires_grad_(False)  # frozen: not selected by ParameterMonitor
    t = trainer(tmp_path, all_monitors(every_n_steps=1), max_steps=2)
    t.fit(model, fixed_loader(saturating_batch(), 2))
    tags = read_events(t.logger.log_dir).Tags()
    assert "activation/act/mean" in tags["scalars"]
    assert not any("unused" in tag or "hidden.weight" in tag for tag in tags["scalars"] + tags["histograms"])


@pytest.mark.parametrize("callback", all_monitors(), ids=lambda c: type(c).__name__)
def test_no_logger_is_a_clear_error(tmp_path, callback):
    t = trainer(tmp_path, [callback], logger=False, max_steps=1)
    with pytest.raises(MisconfigurationException, match=r"logger=False.*TensorBoardLogger"):
        t.fit(TanhMLP(LR), fixed_loader(saturating_batch(), 1))


def test_csv_logger_gets_the_scalars(tmp_path):
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    t = trainer(tmp_path, all_monitors(every_n_steps=1), logger=csv, max_steps=2)
    t.fit(TanhMLP(LR), fixed_loader(saturating_batch(), 2))
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in (
        "activation/act/saturation",
        "activation_grad/act/std",
        "param_grad/head.weight/grad_to_data",
        "update_ratio/head.weight",
    ):
        assert column in header


def test_hooks_are_removed_after_fit_and_on_exception(tmp_path):
    model = TanhMLP(LR)
    t = trainer(tmp_path, [ActivationMonitor(), GradientMonitor()], max_steps=1)
    t.fit(model, fixed_loader(saturating_batch(), 1))
    assert not model.act._forward_hooks and not model.relu._forward_hooks

    class Boom(TanhMLP):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    model = Boom(LR)
    t = trainer(tmp_path, [ActivationMonitor(), GradientMonitor()], max_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(model, fixed_loader(saturating_batch(), 1))
    assert not model.act._forward_hooks


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ActivationMonitor(every_n_steps=-1), "Expected `every_n_steps`"),
        (lambda: ActivationMonitor(histogram_every_n_steps=1.5), "Expected `histogram_every_n_steps`"),
        (lambda: ActivationMonitor(bins=0), "Expected `bins`"),
        (lambda: ActivationMonitor(modules=[3]), "Expected `modules`"),
        (lambda: ActivationMonitor(saturation_threshold=1.5), "Expected `saturation_threshold`"),
        (lambda: GradientMonitor(vanishing_ratio=0), "Expected `vanishing_ratio`"),
        (lambda: ParameterMonitor(min_ndim=-1), "Expected `min_ndim`"),
        (lambda: ParameterMonitor(params=[1]), "Expected `params`"),
        (lambda: UpdateRatioMonitor(low=-1, high=-2), "Expected `low` < `high`"),
        (lambda: UpdateRatioMonitor(patience=0), "Expected `patience`"),
        (lambda: UpdateRatioMonitor(warn="yes"), "Expected `warn`"),
    ],
)
def test_invalid_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_health_warnings_once_and_summary(tmp_path):
    x = saturating_batch(16)  # 25 % saturated tanh
    activation = ActivationMonitor(every_n_steps=1, saturation_warning=0.2)  # 25 % > 20 %
    ratio = UpdateRatioMonitor(every_n_steps=1, patience=3)  # lr 0.1 on this tiny net: ratios above -2
    t = trainer(tmp_path, [activation, ratio], max_steps=6)
    with pytest.warns(UserWarning) as record:
        t.fit(TanhMLP(LR), fixed_loader(x, 6))
    messages = [str(w.message) for w in record]
    assert sum("`act (Tanh)` is saturated" in m for m in messages) == 1
    assert sum("`relu (ReLU)` has" in m and "dead units" in m for m in messages) == 1
    assert any("updates are large" in m and "`head.weight`" in m for m in messages)
    assert "saturation/act" in activation.state_dict()["warned"]
    summary = activation.part.summary_text(activation.probe, 5)
    assert "act (Tanh)" in summary and "is saturated" in summary


def test_makemore_module(tmp_path):
    """The project's own model: the deep BatchNorm MLP, with values checked against the tensors."""
    makemore = pytest.importorskip("lightning_makemore")
    model = makemore.MakemoreModule(vocab=[".", *"abcdefghijklmnopqrstuvwxyz"], block_size=3, n_layers=2, n_hidden=32)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 27, (32 * 4, 3), generator=g), torch.randint(0, 27, (32 * 4,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    seen = {}

    class Reference(Recorder):
        def on_fit_start(self, trainer, pl_module):
            act = pl_module.net.blocks[0].act
            act.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.detach().clone()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            w = pl_module.net.blocks[0].linear.weight
            seen[trainer.global_step] = {
                "saturation": (seen["h"].abs() > 0.97).float().mean().item(),
                "std": seen["h"].std().item(),
                "grad_to_data": (w.grad.std() / w.std()).item(),
            }

    t = trainer(tmp_path, [*all_monitors(every_n_steps=1), Reference(0.1)], max_steps=4, limit_val_batches=0)
    t.fit(model, loader)
    acc = read_events(t.logger.log_dir)
    for step in range(4):
        ref = seen[step]
        assert scalars(acc, "activation/net.blocks.0.act/saturation")[step] == pytest.approx(ref["saturation"])
        assert scalars(acc, "activation/net.blocks.0.act/std")[step] == pytest.approx(ref["std"], rel=1e-5)
        grad_to_data = scalars(acc, "param_grad/net.blocks.0.linear.weight/grad_to_data")[step]
        assert grad_to_data == pytest.approx(ref["grad_to_data"], rel=1e-4)
    tags = acc.Tags()
    assert {"activation_grad/net.blocks.1.act/std", "update_ratio/net.embedding.weight"} <= set(tags["scalars"])
    assert "activation/net.blocks.1.act" in tags["histograms"]  # the final step always has histograms


class FunctionalMLP(TanhMLP):
    """Activations as function calls only: the default selection finds nothing to hook."""

    def __init__(self) -> None:
        super().__init__(unused=False)
        del self.act, self.relu

    def forward(self, x):
        return self.head(torch.cat([torch.tanh(x), F.relu(self.hidden(x))], dim=1))


@pytest.mark.parametrize("monitor", [ActivationMonitor, GradientMonitor])
def test_functional_model_gets_one_warning_with_a_suggestion(tmp_path, monitor):
    t = trainer(tmp_path, [monitor(every_n_steps=1)], max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(FunctionalMLP(), fixed_loader(saturating_batch(16), 2))
    found = [str(w.message) for w in caught if "found no activation module" in str(w.message)]
    assert len(found) == 1
    assert found[0].startswith(f"{monitor.__name__} found no activation module in FunctionalMLP (it has 2 Linear)")
    assert f"{monitor.__name__}(modules=[nn.Linear])" in found[0]
    assert not any(tag.startswith("activation") for tag in t.logged_metrics)
