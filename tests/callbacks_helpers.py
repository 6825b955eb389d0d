"""Shared pieces of the callbacks tests: a small tanh MLP, fixed data, a reference recorder, event reading, and the
benchmark scripts imported as modules."""

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 8
#: the benchmark scripts (`benchmark_module`)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/{name}.py`` imported as the module ``name``, in ``sys.modules`` while in use (a script's
    dataclasses resolve their annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def saturating_batch(batch_size: int = 16) -> Tensor:
    """A (batch_size, 8) input of which exactly 25 % has |x| = 3 (tanh 0.995, saturated), the rest |x| <= 0.5."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, N_FEATURES, generator=g) - 0.5  # |x| <= 0.5
    x[:, :2] = 3.0 * torch.sign(torch.randn(batch_size, 2, generator=g))  # 2 of 8 columns saturate
    return x


def fixed_loader(x: Tensor, n_batches: int, batch_size: int | None = None) -> DataLoader:
    """A loader yielding the same batch ``x`` (with fixed labels) ``n_batches`` times."""
    batch_size = batch_size or len(x)
    y = torch.arange(len(x)) % 3
    reps = n_batches * batch_size // len(x)
    return DataLoader(TensorDataset(x.repeat(reps, 1), y.repeat(reps)), batch_size=batch_size)


class TanhMLP(L.LightningModule):
    """tanh applied to the (hand-built) input, a ReLU branch with 2 always-dead units, then a linear head.

    ``self.h`` keeps the tanh output with ``retain_grad`` so a test can read the reference gradient.
    """

    def __init__(self, lr: float = 0.1, inplace_relu: bool = False, unused: bool = True) -> None:
        super().__init__()
        self.lr = lr
        self.act = nn.Tanh()
        self.hidden = nn.Linear(N_FEATURES, N_FEATURES)
        self.relu = nn.ReLU(inplace=inplace_relu)
        self.head = nn.Linear(2 * N_FEATURES, 3)
        self.unused = nn.Sigmoid() if unused else None  # a module that is never called
        self.h: Tensor | None = None
        self.r: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(x)  # (B, 8)
        if self.training and h.requires_grad:
            h.retain_grad()
        self.h = h
        z = self.hidden(x)
        z = torch.cat([z[:, :2] - 1e3, z[:, 2:]], dim=1)  # the first 2 units are never positive: dead
        r = self.relu(z)
        self.r = r.detach().clone()
        return self.head(torch.cat([h, r], dim=1))  # (B, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        x = x.clone().requires_grad_(True)  # so the tanh output has a gradient
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(Callback):
    """Reference statistics per optimizer step, computed directly from the tensors (not by the monitors)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.rows: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step  # the optimizer step, Lightning's logging axis with one optimizer
        row = self.rows.setdefault(step, {})
        h, r = pl_module.h, pl_module.r
        row["act_mean"], row["act_std"] = h.mean().item(), h.std().item()
        row["act_saturation"] = (h.abs() > 0.97).float().mean().item()
        row["relu_dead"] = (~(r > 0).any(0)).float().mean().item()
        row["grad_mean"], row["grad_std"] = h.grad.mean().item(), h.grad.std().item()
        for name, p in pl_module.named_parameters():
            if p.ndim == 2:
                row[f"{name}/grad_std"] = p.grad.std().item()
                row[f"{name}/grad_to_data"] = (p.grad.std() / p.std()).item()
                # plain SGD: the update is lr * grad
                row[f"{name}/update_ratio"] = ((self.lr * p.grad).std() / p.std()).log10().item()


def tb_logger(tmp_path: Path, name: str = "run") -> TensorBoardLogger:
    return TensorBoardLogger(str(tmp_path), name=name, version=0, default_hp_metric=False)


def trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("logger", tb_logger(tmp_path))
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        **kwargs,
    )


def read_events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_figures(log_dir: str) -> EventAccumulator:
    """The monitors' figures of a TensorBoard run: the run ``{log_dir}/figures``, written by the figure process."""
    return read_events(os.path.join(log_dir, "figures"))


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def histograms(acc: EventAccumulator, tag: str) -> dict[int, Any]:
    return {e.step: e.histogram_value for e in acc.Histograms(tag)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a TensorBoard server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    """GETs ``url`` (a local server) and decodes its JSON."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


ROOT = Path(__file__).resolve().parents[1]


#: put before every 2-process script: each process destroys its process group when it exits (Lightning 2.2 leaves it
#: to the interpreter's finalisation, where gloo's threads once aborted a rank with "terminate called without an
#: active exception" after a fit that had finished, in CI's lowest-Lightning leg)
EXIT_CLEANLY = """import atexit as _atexit
import torch.distributed as _dist
_atexit.register(lambda: _dist.destroy_process_group() if _dist.is_available() and _dist.is_initialized() else None)
"""

# what Lightning and torch.distributed put into os.environ of the process that launched ranks
LIGHTNING_PROCESS_STATE = (
    "LOCAL_RANK",
    "NODE_RANK",
    "GLOBAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def run_two_process_script(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``source`` (a script that launches its own 2 CPU processes) in ``tmp_path`` with ``args``.

    The timeout makes a hang fail the test instead of the suite.
    """
    script = tmp_path / "run.py"
    script.write_text(EXIT_CLEANLY + source)
    # a fresh process: no Lightning state an earlier test left in os.environ (``seed_everything`` sets PL_GLOBAL_SEED,
    # which seeds the DistributedSampler's shuffle: CI saw the ranks' batches differ from the twin's)
    env = {k: v for k, v in os.environ.items() if k not in LIGHTNING_PROCESS_STATE and not k.startswith("PL_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PL_DISABLE_FORK="1")
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


class TensorBoardServer:
    """The real TensorBoard serving a log directory on a free local port (see :func:`tensorboard_server`)."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    def poll(self, fetch: Callable[[], Any], timeout: float) -> Any:
        """Calls ``fetch`` until it returns something truthy or ``timeout`` s pass (then the last result).

        ``OSError`` means "not listening yet"; a server that exited fails the test at once with its stderr.
        """
        deadline = time.monotonic() + timeout
        result = None
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                result = fetch()
                if result:
                    return result
            if self.process.poll() is not None:
                pytest.fail(f"tensorboard exited: {self.process.stderr.read()[-2000:]}")
            time.sleep(0.5)
        return result


@contextlib.contextmanager
def tensorboard_server(logdir: Path) -> Iterator[TensorBoardServer]:
    """Starts ``tensorboard --logdir logdir`` on 127.0.0.1 and stops it (killed if it must be) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield TensorBoardServer(process, f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
