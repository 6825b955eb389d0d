"""Cost of the four monitors: ``Trainer.fit`` of the lecture's small tanh MLP with and without them.

Shape as in the lecture: Embedding(27, 10), context 3, Linear(30, 200) -> BatchNorm1d -> Tanh ->
Linear(200, 27), batch 32, plain SGD; random data tensors (no I/O), one intra-op thread. A user's plain
LightningModule (``self.log`` on every step, default Trainer loop), not this project's: the callbacks as
someone else would plug them in. Configurations: no callbacks; four empty ``Callback()`` (Lightning's own
per-callback cost); the four monitors passed separately; the four in one ``CallbackGroup``. Monitors at
their default cadence with ``log_every_n_steps=50`` (Lightning's default): scalars every 50 steps,
histograms every 500, figures every 100,000 and at the end of fit.

Each repeat times one ``fit`` per configuration, alternating, after a warm-up fit of each (imports,
first-call costs); medians over repeats. Two figures per configuration: the training steps (from the
end of optimizer step ``--warmup`` to the end of the last one, read by torch's global optimizer-step
hook) and what follows the last step (the end-of-fit figures and summary: a one-off cost, the same for
5,000 steps as for 200,000).

    python benchmarks/bench_callbacks.py --steps 5000 --repeats 5

Target (issue 3): monitors / no callbacks <= 1.10 over the training steps.
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
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor


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


STAMPS: list[tuple[float, float]] = []  # (wall, cpu) at the end of each optimizer step


def _stamp(*args: object) -> None:
    STAMPS.append((time.perf_counter(), time.process_time()))


def _monitors() -> list[Callback]:
    return [ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()]


def fit_seconds(steps: int, config: str, log_dir: str, warmup: int) -> dict[str, float]:
    """Wall and CPU seconds of one ``fit``'s steps after ``warmup``, and wall seconds after its last step."""
    torch.manual_seed(0)
    x = torch.randint(0, 27, (steps * 32, 3))
    y = torch.randint(0, 27, (steps * 32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    callbacks: list[Callback] = {
        "none": lambda: [],
        "noop": lambda: [Callback() for _ in range(4)],
        "monitors": _monitors,
        "group": lambda: [CallbackGroup(_monitors())],
    }[config]()
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
    STAMPS.clear()
    trainer.fit(model, loader)
    end = time.perf_counter()
    (w0, c0), (w1, c1) = STAMPS[warmup - 1], STAMPS[-1]
    return {"steps_wall": w1 - w0, "steps_cpu": c1 - c0, "after": end - w1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    register_optimizer_step_post_hook(_stamp)
    configs = ("none", "noop", "monitors", "group")
    results: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as log_dir:
        fit_seconds(args.warmup + 100, "none", log_dir, args.warmup)  # imports, allocator, first calls
        fit_seconds(600, "monitors", log_dir, args.warmup)  # matplotlib import, first figures
        for _ in range(args.repeats):
            for config in configs:  # alternating, so that drifts of the machine hit all alike
                results[config].append(fit_seconds(args.steps, config, log_dir, args.warmup))
    timed = args.steps - args.warmup
    print(f"steps {args.steps} ({timed} timed after {args.warmup}), repeats {args.repeats}, torch threads 1")
    median = {c: {k: statistics.median(r[k] for r in results[c]) for k in results[c][0]} for c in configs}
    for config in configs:
        m = median[config]
        runs = ", ".join(f"{r['steps_wall']:.2f}" for r in results[config])
        print(
            f"{config:>9}: steps {m['steps_wall']:.3f} s wall / {m['steps_cpu']:.3f} s CPU"
            f" ({1e3 * m['steps_cpu'] / timed:.3f} ms/step), after the last step {m['after']:.3f} s  [{runs}]"
        )
    for config in ("noop", "monitors", "group"):
        wall = median[config]["steps_wall"] / median["none"]["steps_wall"]
        cpu = median[config]["steps_cpu"] / median["none"]["steps_cpu"]
        target = "  (target <= 1.10)" if config != "noop" else ""
        print(f"ratio {config} / none over the steps: wall {wall:.3f}, CPU {cpu:.3f}{target}")
    extra = median["monitors"]["after"] - median["none"]["after"]
    print(f"end of fit with the monitors (figures, summary): +{extra:.2f} s once")


if __name__ == "__main__":
    main()
