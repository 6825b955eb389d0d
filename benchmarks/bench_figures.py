"""The cost of one monitor figure: drawing it (``callbacks.figures``) and rendering it to the RGB array a logger gets.

    python benchmarks/bench_figures.py      # prints a markdown table; one thread, the lecture's deep-net sizes

Each figure is drawn as the monitors draw it on a figure step: the activation and gradient distributions of
5 layers from pre-binned histograms (64 bins), the weight-gradient distributions of 7 parameters, and the
update-ratio history of 7 parameters over 4,000 logged steps (a 200,000-step run at ``log_every_n_steps=50``).
Compared with one training step of the lecture's deep net (batch 32) measured in the same process.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.figures import Distribution, figure_to_array, plot_distributions, plot_update_ratios


def _timed(fn, repeat: int = 7) -> float:
    fn()  # warm-up: matplotlib's font cache, imports
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _distributions(n: int, legend: str) -> dict[str, Distribution]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(n):
        counts, edges = torch.histogram(torch.tanh(torch.randn(3200, generator=g) * (i + 1)), bins=64)
        out[f"net.blocks.{i}.act (Tanh)"] = Distribution(edges.tolist(), counts.tolist(), legend)
    return out


def _train_step() -> float:
    from torch import nn

    layers: list[nn.Module] = [nn.Embedding(27, 10), nn.Flatten()]
    fan_in = 30
    for _ in range(5):
        layers += [nn.Linear(fan_in, 100, bias=False), nn.BatchNorm1d(100), nn.Tanh()]
        fan_in = 100
    net = nn.Sequential(*layers, nn.Linear(100, 27))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randint(0, 27, (32, 3)), torch.randint(0, 27, (32,))

    def step() -> None:
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _timed(lambda: [step() for _ in range(100)]) / 100


def main() -> None:
    torch.set_num_threads(1)
    activations = _distributions(5, "mean +0.00, std 0.64, saturated 2.41%")
    grads = _distributions(7, "std 1.2e-03, grad:data 1.1e-02")
    history = {f"net.blocks.{i}.linear.weight": [-3.0 + 0.001 * k for k in range(4000)] for i in range(7)}
    steps = list(range(49, 200_000, 50))
    cases = {
        "activation distribution (5 layers)": lambda: plot_distributions(activations, "activation distribution"),
        "weight-gradient distribution (7 parameters)": lambda: plot_distributions(grads, "gradient", xlabel="grad"),
        "update-ratio history (7 x 4,000 points)": lambda: plot_update_ratios(history, steps),
    }
    step = _train_step()
    print(f"one training step of the deep net (batch 32, 1 thread): {step * 1e3:.2f} ms\n")
    print("| figure | draw + render (s) | in training steps |")
    print("|---|---|---|")
    for name, draw in cases.items():
        seconds = _timed(lambda draw=draw: figure_to_array(draw()))
        print(f"| {name} | {seconds:.3f} | {seconds / step:.0f} |")


if __name__ == "__main__":
    main()
