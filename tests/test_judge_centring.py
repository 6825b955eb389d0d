"""The not-zero-centred judge: a sigmoid between layers, told to become tanh; the healed model trains better."""

from __future__ import annotations

import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from callbacks import HealthMonitor
from callbacks._stats import Summary
from callbacks.judges.base import Action, Readouts
from callbacks.judges.centring import NotZeroCentred
from callbacks.probes.activation import Activations, Layer


def layer(name: str, kind: str, lo: float, mean: float) -> Layer:
    s = Summary(100, 0, mean, 0.2, lo, 1.0, 100 * mean, 100 * (mean**2 + 0.04))
    return Layer(name, f"{name} (X)", kind, s, 0.0 if kind == "bounded" else None, None, None, None)


def test_a_bounded_activation_all_positive_around_half_on_three_steps_is_found_once():
    judge = NotZeroCentred(patience=3)
    readouts = Readouts.of(
        Activations(
            0,
            [
                layer("sig", "bounded", 0.01, 0.5),  # a sigmoid
                layer("tanh", "bounded", -0.9, 0.02),  # zero-centred
                layer("low", "bounded", 0.0, 0.1),  # positive but near 0 (a sigmoid pushed low): below MIN_MEAN
                layer("relu", "relu_like", 0.0, 0.5),  # ReLU's positive mean is not this judge's business
            ],
        )
    )
    assert judge.observe(0, readouts) == [] and judge.observe(1, readouts) == []
    (finding,) = judge.observe(2, readouts)
    assert (finding.key, finding.where, finding.step) == ("centring/sig", "sig (X)", 2)
    assert finding.action == Action("activation", ("sig",), "tanh", "all outputs >= 0, mean 0.50")
    assert "mean 0.50" in finding.message and "tanh" in finding.fix
    assert judge.observe(3, readouts) == []  # said once (the streak goes on)


class MLP(L.LightningModule):
    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] * x[:, 2] > 0).long()  # 4 classes, one of them an XOR
    return x, y


def fit(act: type[nn.Module], tmp_path) -> tuple[HealthMonitor, float]:
    x, y = data()
    monitor = HealthMonitor(every_n_steps=10, report=False, warn=False)
    trainer = L.Trainer(
        max_steps=300, logger=CSVLogger(tmp_path), callbacks=[monitor], accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    model = MLP(act)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader)
    with torch.no_grad():
        return monitor, F.cross_entropy(model.net(x), y).item()


def test_the_sigmoid_mlp_is_told_to_use_tanh_and_the_tanh_mlp_trains_better(tmp_path):
    sigmoid, sigmoid_loss = fit(nn.Sigmoid, tmp_path / "sigmoid")
    found = [f for f in sigmoid.findings if f.key.startswith("centring/")]
    assert [f.where for f in found] == ["net.1 (Sigmoid)", "net.3 (Sigmoid)"]
    assert {f.action.value for f in found} == {"tanh"}
    tanh, tanh_loss = fit(nn.Tanh, tmp_path / "tanh")
    assert [f for f in tanh.findings if f.key.startswith("centring/")] == []
    assert tanh_loss < sigmoid_loss - 0.05, (tanh_loss, sigmoid_loss)  # the advice, followed, helps
