"""Cost of the four monitors: ``Trainer.fit`` of the lecture's small tanh MLP with and without them.

Shape as in the lecture: Embedding(27, 10), context 3, Linear(30, 200) -> BatchNorm1d -> Tanh ->
Linear(200, 27), batch 32, plain SGD; random data tensors (no I/O), one intra-op thread. Each repeat
times one ``fit`` per configuration, alternating, after a warm-up fit of each (imports, first-call
costs); the median over repeats is reported. The monitors run at their default cadence with
``log_every_n_steps=50`` (Lightning's default): scalars every 50 steps, histograms every 500, figures
every 5,000 and at the end of fit, which is included in the time.

    python benchmarks/bench_callbacks.py --steps 5000 --repeats 3

Target: ratio <= 1.10.
"""

import argparse
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor


class LectureMLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(27, 10),
            nn.Flatten(),  # (B, 3 * 10)
            nn.Linear(30, 200, bias=False),
            nn.BatchNorm1d(200),
            nn.Tanh(),
            nn.Linear(200, 27),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_seconds(steps: int, config: str, log_dir: str) -> tuple[float, float]:
    """Wall and CPU seconds of one ``fit``; ``config``: "none", "noop" (4 empty callbacks), "monitors"."""
    torch.manual_seed(0)
    x = torch.randint(0, 27, (steps * 32, 3))
    y = torch.randint(0, 27, (steps * 32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    callbacks: list[Callback] = {
        "none": [],
        "noop": [Callback() for _ in range(4)],
        "monitors": [ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()],
    }[config]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        log_every_n_steps=50,
        logger=TensorBoardLogger(log_dir, name=config),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = LectureMLP()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    configs = ("none", "noop", "monitors")
    with tempfile.TemporaryDirectory() as log_dir:
        fit_seconds(200, "none", log_dir)  # warm-up: imports, allocator, first calls
        fit_seconds(600, "monitors", log_dir)  # warm-up with monitors: matplotlib import, first figure
        wall: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        for _ in range(args.repeats):
            for config in configs:  # alternating, so that drifts of the machine hit all alike
                w, c = fit_seconds(args.steps, config, log_dir)
                wall[config].append(w)
                cpu[config].append(c)
    print(f"steps {args.steps}, repeats {args.repeats}, torch threads {torch.get_num_threads()}")
    for name, times in (("wall", wall), ("cpu", cpu)):
        median = {c: statistics.median(times[c]) for c in configs}
        for config in configs:
            runs = ", ".join(f"{t:.2f}" for t in times[config])
            ms = 1e3 * median[config] / args.steps
            print(f"{name:>4} {config:>9}: median {median[config]:.3f} s ({ms:.3f} ms/step)  [{runs}]")
        print(
            f"{name:>4} ratio four monitors / no callbacks: {median['monitors'] / median['none']:.3f}  (target <= 1.10)"
        )
        print(f"{name:>4} ratio four no-op callbacks / no callbacks: {median['noop'] / median['none']:.3f}")
    print("(cpu: process time, less sensitive to other load on the machine than wall time)")


if __name__ == "__main__":
    main()
