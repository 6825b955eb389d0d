"""Draws the pictures of docs/charts.md (healthy, saturated, vanishing) with ``callbacks.figures``.

A 5-layer tanh MLP (Linear(100) -> Tanh, no BatchNorm) as in the lecture, on random character
contexts, with three weight gains: 5/3 (Kaiming for tanh: healthy), 3 (saturated), 0.5 (vanishing).
Then 1,000 SGD steps of the healthy net through Lightning with ``UpdateRatioMonitor``.

    python docs/make_callbacks_figures.py   # writes docs/img/callbacks_*.png (about 20 s on CPU)
"""

import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import UpdateRatioMonitor
from callbacks.figures import plot_distributions, plot_update_ratios

OUT = Path(__file__).parent / "img"


def deep_tanh(gain: float, seed: int = 2147483647) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Embedding(27, 10), nn.Flatten()]  # (B, 30)
    fan_in = 30
    for _ in range(5):
        linear = nn.Linear(fan_in, 100, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(100, fan_in, generator=g) * gain / fan_in**0.5)
        layers += [linear, nn.Tanh()]
        fan_in = 100
    head = nn.Linear(100, 27)
    with torch.no_grad():
        head.weight.mul_(0.1)  # softmax starts near uniform (loss ~ ln 27)
    return nn.Sequential(*layers, head)


def activations_and_grads(net: nn.Sequential, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Tanh outputs and their gradients, the lecture's way (``retain_grad``)."""
    outs: dict[str, Tensor] = {}
    h = x
    for i, layer in enumerate(net):
        h = layer(h)
        if isinstance(layer, nn.Tanh):
            h.retain_grad()
            outs[f"layer {i} (Tanh)"] = h
    nn.functional.cross_entropy(h, y).backward()
    return {k: v.detach() for k, v in outs.items()}, {k: v.grad for k, v in outs.items()}


class Lm(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    warnings.filterwarnings("ignore")
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(42)
    x, y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
    for label, gain in (("healthy", 5 / 3), ("saturated", 3.0), ("vanishing", 0.5)):
        acts, grads = activations_and_grads(deep_tanh(gain), x, y)
        title = f"activation distribution, gain {gain:.2f} ({label})"
        plot_distributions(acts, title, saturation_threshold=0.97).savefig(OUT / f"callbacks_activations_{label}.png")
        title = f"gradient distribution, gain {gain:.2f} ({label})"
        plot_distributions(grads, title, xlabel="gradient").savefig(OUT / f"callbacks_gradients_{label}.png")

    xs, ys = torch.randint(0, 27, (32_000, 3), generator=g), torch.randint(0, 27, (32_000,), generator=g)
    monitor = UpdateRatioMonitor(every_n_steps=10)
    trainer = L.Trainer(
        max_steps=1000,
        logger=CSVLogger("/tmp/callbacks_figures"),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Lm(deep_tanh(5 / 3)), DataLoader(TensorDataset(xs, ys), batch_size=32, shuffle=True))
    plot_update_ratios(monitor.history, monitor.steps).savefig(OUT / "callbacks_update_ratio.png")
    print("wrote", sorted(p.name for p in OUT.glob("callbacks_*.png")))


if __name__ == "__main__":
    main()
