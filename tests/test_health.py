"""The health warnings on small versions of the lecture's healthy and broken nets: healthy ones stay silent, each
broken one raises the warning that names its real cause, with advice that fits the model; and how they print."""

import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from callbacks._warnings import HealthWarning

ROOT = Path(__file__).resolve().parents[1]
N_IN, N_HIDDEN, N_CLASSES, N_LAYERS = 30, 64, 10, 3


def make_net(
    init_gain: float | None = 5 / 3,
    batchnorm: bool = False,
    bn_gamma: float = 1.0,
    activation: type[nn.Module] = nn.Tanh,
    head_scale: float = 0.01,
    dead_bias: bool = False,
) -> nn.Sequential:
    """The lecture's MLP shape: [Linear -> (BatchNorm) -> act] x 3 -> Linear head.

    ``init_gain``: hidden weights ``randn * gain / sqrt(fan_in)`` (5/3: Kaiming for tanh); None: plain ``randn``
    (the lecture's naive init). ``head_scale``: the head scaled down so the softmax starts near uniform.
    ``dead_bias``: half the units of every layer get a bias of -100 (never positive: dead ReLUs).
    """
    g = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    fan_in = N_IN
    for _ in range(N_LAYERS):
        linear = nn.Linear(fan_in, N_HIDDEN, bias=not batchnorm)
        with torch.no_grad():
            scale = 1.0 if init_gain is None else init_gain / fan_in**0.5
            linear.weight.copy_(torch.randn(N_HIDDEN, fan_in, generator=g) * scale)
            if linear.bias is not None:
                linear.bias.zero_()
                if dead_bias:
                    linear.bias[: N_HIDDEN // 2] = -100.0
        layers.append(linear)
        if batchnorm:
            bn = nn.BatchNorm1d(N_HIDDEN)
            with torch.no_grad():
                bn.weight.fill_(bn_gamma)
            layers.append(bn)
        layers.append(activation())
        fan_in = N_HIDDEN
    head = nn.Linear(fan_in, N_CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(N_CLASSES, fan_in, generator=g) * head_scale)
        head.bias.zero_()
    return nn.Sequential(*layers, head)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(steps: int, batch_size: int = 32) -> DataLoader:
    """A learnable task: 10 classes from a fixed random linear teacher on Gaussian inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch_size, N_IN, generator=g)
    y = (x @ torch.randn(N_IN, N_CLASSES, generator=g)).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def fit(tmp_path: Path, net: nn.Module, lr: float, steps: int = 150) -> list[str]:
    """Trains with the four monitors (scalars every 3 steps); returns the health warnings raised."""
    group = CallbackGroup([ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=3,
        logger=CSVLogger(str(tmp_path)),
        callbacks=[group],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is fastest, and the machine may be shared
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(Classifier(net, lr), loader(steps))
    finally:
        torch.set_num_threads(threads)
    return [str(w.message) for w in caught if issubclass(w.category, HealthWarning)]


@pytest.mark.parametrize(
    ("net", "lr"),
    [
        pytest.param(lambda: make_net(), 0.1, id="kaiming-tanh"),
        pytest.param(lambda: make_net(batchnorm=True), 0.1, id="batchnorm-tanh"),
        # ReLU nets take a smaller lr than tanh ones for the same update:data ratio (gain sqrt(2), no squashing)
        pytest.param(lambda: make_net(init_gain=2**0.5, activation=nn.ReLU), 0.03, id="kaiming-relu"),
    ],
)
def test_healthy_nets_raise_nothing(tmp_path, net, lr):
    """Including the head scaled down at init, whose update ratio is far above -2 early on (expected)."""
    assert fit(tmp_path, net(), lr=lr) == []


def test_naive_init_warns_saturation_and_advises_scaling(tmp_path):
    messages = fit(tmp_path, make_net(init_gain=None), lr=0.1)
    assert [m.split("`")[1] for m in messages] == ["net.1 (Tanh)", "net.3 (Tanh)", "net.5 (Tanh)"]
    assert all("is saturated" in m and "Scale the weights of the layer before it down" in m for m in messages)


def test_saturation_after_batchnorm_advises_the_lr_not_batchnorm(tmp_path):
    """A tanh fed by a BatchNorm whose gain is large: the advice names the norm, never "add BatchNorm"."""
    messages = fit(tmp_path, make_net(batchnorm=True, bn_gamma=4.0), lr=0.1)
    saturation = [m for m in messages if "is saturated" in m]
    assert saturation, messages
    for m in saturation:  # `net.{2k+2} (Tanh)` is fed by `net.{2k+1} (BatchNorm1d)`
        act = int(m.split("`")[1].split(" ")[0].split(".")[1])
        assert f"already normalised by `net.{act - 1} (BatchNorm1d)`" in m
    assert not any("normalise its input" in m for m in saturation)


def test_too_high_lr_warns_lr_too_high(tmp_path):
    messages = fit(tmp_path, make_net(batchnorm=True), lr=5.0)
    assert any("The learning rate may be too high" in m for m in messages), messages
    assert not any("too low" in m for m in messages)


def test_too_low_lr_warns_lr_too_low(tmp_path):
    messages = fit(tmp_path, make_net(batchnorm=True), lr=1e-5)
    assert messages == [m for m in messages if "The learning rate may be too low" in m] and messages


def test_dead_relus_warn_dead_units(tmp_path):
    messages = fit(tmp_path, make_net(init_gain=2**0.5, activation=nn.ReLU, dead_bias=True), lr=0.1)
    dead = [m for m in messages if "dead units" in m]
    assert dead and "`net.1 (ReLU)` has 50.0% dead units" in dead[0], messages


def test_warning_prints_one_line_without_source_echo():
    """Outside pytest: `HealthWarning: ...` on one line through tqdm.write, no source line; filters still work."""
    code = f"""
import sys, warnings
sys.path.insert(0, {str(ROOT)!r})
# Lightning < 2.3 warns about its own pkg_resources import when imported: not ours, not under test
warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated")
from callbacks._warnings import HealthWarning, health_warning
health_warning("ActivationMonitor: shown")
warnings.filterwarnings("ignore", category=HealthWarning)
health_warning("ActivationMonitor: ignored")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["HealthWarning: ActivationMonitor: shown"]


def test_warning_under_pytest_is_a_catchable_health_warning():
    from callbacks._warnings import health_warning

    with pytest.warns(HealthWarning, match="^ActivationMonitor: x$"):
        health_warning("ActivationMonitor: x")
