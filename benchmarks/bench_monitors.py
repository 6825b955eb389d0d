"""Cost of the monitors on a GPT-style decoder, next to what practitioners use today (issue 14).

The model is nanoGPT's "baby GPT" written out in plain torch: 6 pre-LayerNorm blocks, 384 wide, 6 heads,
a GELU MLP (4x), context 128, a 65-token vocabulary (nanoGPT's shakespeare_char), weights tied between the
token embedding and the head, no dropout; batch 16, AdamW (lr 6e-4, betas (0.9, 0.95), weight decay 0.1).
About 10.7 M parameters. It trains with Lightning on random tokens (no data files), one intra-op thread on
CPU by default, in fp32 (`--device cuda --precision bf16-mixed` on a GPU).

Rows, each a fresh `Trainer.fit` of a fresh model (all with `log_every_n_steps=50`, Lightning's default,
and `self.log("train/loss")` every step):

- ``none``: no monitoring (`TensorBoardLogger`).
- ``scalars``: the four monitors, scalars every 10 steps, no histograms.
- ``dense``: the four monitors, scalars and histograms every 10 steps.
- ``default``: the four monitors at their defaults (scalars every 50 steps, histograms every 500).
- ``wandb``: `wandb.watch(model, log="all", log_freq=10)` with `WandbLogger` offline (`WANDB_MODE=offline`,
  in a temp folder).
- ``grad_norm``: `lightning.pytorch.utilities.grad_norm` logged with `self.log_dict` every step in
  `on_before_optimizer_step` (Lightning's recipe).
- ``tb_hist``: a hand-written callback calling `SummaryWriter.add_histogram` on every parameter and its
  gradient every 10 steps.
- ``health``: `HealthMonitor()` at its defaults (the four monitors, the loss and the diagnoses; scalars every
  50 steps, so none in a short window: what it costs between recorded steps).
- ``trace``: `HealthMonitor(trace=True)`: the same plus the every-step trace of the loss-spike diagnosis (each
  parameter's gradient norm and sampled update:data ratio, each watched module's output RMS, every step).

Timing: torch's global optimizer-step hook stamps the end of every optimizer step. A fit runs ``--warmup``
+ 1 + ``--steps`` steps and is stopped after the last one (so the monitors log no final-step histogram);
the timed window is the ``--steps`` intervals after the warm-up. Every row logs on the same steps of the
window (a multiple of 10), so a logged step's whole cost (forward hooks, backward hooks, the hooks after
the optimizer step) falls inside it. On CPU, time is CPU time of this process and its children (the
wandb-core service), which a busy shared machine disturbs much less than wall time; wall time is reported
too. Rows alternate within each repeat (rotated each repeat); figures are medians over repeats.

``default`` logs histograms every 500 steps, longer than a CPU window can afford; when ``--steps`` < 500
it is not run but composed from measured rows: at `log_every_n_steps=50`, 1,000 steps hold 18 steps with
scalars only (cost of one: 10 x (``scalars`` - ``none``) per step) and 2 with scalars and histograms (10 x
(``dense`` - ``none``)), the rest asleep (the monitors' sleeping steps cost microseconds:
`benchmarks/bench_callbacks.py`). The log size is composed the same way. Run directly (``--steps`` >= 500),
its first histogram step and the figure drawn on it fall in the window unless ``--warmup`` is >= 500.

Memory: peak RSS of this process sampled every 10 ms during each fit, minus its RSS when the fit starts
(all rows share one process, so the growth is the per-row figure; allocator caches from earlier rows
may hide part of it). Log size: bytes of the TensorBoard event records of the window's steps (or, for
W&B, of the `.wandb` history records that hold histograms), per 1,000 steps.

    python benchmarks/bench_monitors.py --repeats 2     # 12 min on 2 quiet CPU cores (a step is ~2 s)
    python benchmarks/bench_monitors.py --quick         # a tiny model, one repeat: checks the script runs
    python benchmarks/bench_monitors.py --compile       # the same rows on torch.compile'd models
    python benchmarks/bench_monitors.py --device cuda --precision bf16-mixed --steps 1000
    python benchmarks/bench_monitors.py --profile dense # cProfile of one fit's window, top lines
    python benchmarks/bench_monitors.py --rows none trace --repeats 3   # what the every-step trace costs
    python benchmarks/bench_monitors.py --memory --repeats 1           # peak memory of a recorded step

With ``--profile ROW`` it also prints the CPU seconds spent inside ``callbacks/`` in the window (each call into
the package from outside it counted once: Lightning's hook calls, forward hooks, tensor hooks).

``--memory``: the peak memory of one training step, recorded or not, on issue 20's model (6 pre-LayerNorm
blocks, width 256, 256 tokens, 4 heads, batch 16, AdamW). Each case is a fresh process (``MEMORY_CASES``): a
fit stopped after step 3 (after AdamW's state exists; the monitors record every 2 steps, i.e. steps 1 and 3,
or every 1,000, i.e. not step 3; figures only on their first recorded step, never on step 3). The kernel's
peak RSS (``VmHWM``) is reset when step 3 starts and read when it ends, after every monitor's hook; on CUDA,
``torch.cuda.max_memory_allocated`` over the same step. Every case but ``none`` has imported matplotlib and
drawn one figure first, so a monitor's first figure does not count as the step's memory. The histograms of
step 3 are read back from the log, to show which step recorded. RSS also holds what glibc's allocator keeps
after a free (tens of MiB, different in each process); ``--mmap-threshold 65536`` gives every tensor of 64 KiB
or more its own mapping, returned when freed, so that the peak RSS follows the peak of live memory.

``--json PATH`` writes the measurements, for ``benchmarks/before_after.py`` (the same benchmark on two
checkouts, alternately, in one session).

Targets (issue 14): ``default`` <= 2 % overhead on CPU; ``dense`` no slower than ``wandb`` and ``tb_hist``;
log bytes per histogram no more than TensorBoard's own `add_histogram`. Issue 18: ``trace`` at most 1 % over
``none``. Issue 20: a recorded step's peak at most an unrecorded one's plus about one watched tensor.
"""

import argparse
import contextlib
import cProfile
import io
import json
import logging
import math
import os
import platform
import pstats
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from callbacks import ActivationMonitor, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

ROWS = ("none", "scalars", "dense", "default", "wandb", "grad_norm", "tb_hist", "health", "trace")
LOG_EVERY = 50  # Trainer(log_every_n_steps=...), Lightning's default
CADENCE = 10  # the dense rows: every 10 steps


# ---------------------------------------------------------------------------------------------- model
@dataclass
class GPTConfig:
    vocab_size: int = 65  # nanoGPT's shakespeare_char
    block_size: int = 128  # context
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU()  # a module, so that ActivationMonitor finds it
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's decoder: token and position embeddings, pre-LayerNorm blocks, the head tied to the token
    embedding as in GPT-2 and nanoGPT (``tied=False``: a head of its own, e.g. for a diagnosis to name it)."""

    def __init__(self, cfg: GPTConfig, tied: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class GPTModule(L.LightningModule):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = GPT(cfg)

    @override
    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, T) each
        logits = self(x)  # (B, T, vocab)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        self.log("train/loss", loss)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)


class GradNormGPT(GPTModule):
    """Lightning's documented recipe: the norms of all gradients, logged on every step."""

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


class TBHistograms(Callback):
    """What people write themselves: `add_histogram` on every parameter and its gradient every n steps."""

    def __init__(self, every_n_steps: int = CADENCE) -> None:
        self.every_n_steps = every_n_steps

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        writer = trainer.logger.experiment
        for name, p in pl_module.named_parameters():
            writer.add_histogram(name, p, step)
            if p.grad is not None:
                writer.add_histogram(f"{name}.grad", p.grad, step)


# ---------------------------------------------------------------------------------------------- clocks
def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process from /proc (Linux), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """Process ids of all descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _children_cpu() -> float:
    return sum(_proc_cpu_seconds(p) for p in _descendants(os.getpid()))


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far (kilobytes on Linux, bytes on macOS)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


class Clock:
    """Stamps the end of every optimizer step; stops the fit after ``last``; profiles the window if asked."""

    def __init__(self) -> None:
        self.first = self.last = 0  # the window: intervals first+1 .. last
        self.cuda = False
        self.trainer: L.Trainer | None = None
        self.profiler: cProfile.Profile | None = None
        self.stamps: list[tuple[float, float]] = []
        self.children_cpu: list[float] = []

    def __call__(self, *args: object) -> None:
        i = len(self.stamps)
        if i == self.first:
            self.children_cpu.append(_children_cpu())
            if self.profiler is not None:
                self.profiler.enable()
        if self.cuda and i in (self.first, self.last):
            torch.cuda.synchronize()
        self.stamps.append((time.perf_counter(), time.process_time()))
        if i == self.last:
            if self.profiler is not None:
                self.profiler.disable()
            self.children_cpu.append(_children_cpu())
            assert self.trainer is not None
            self.trainer.should_stop = True


CLOCK = Clock()


# ---------------------------------------------------------------------------------------------- log sizes
def _tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file (TensorBoard event file): length, crc, data, crc."""
    data, out, pos = path.read_bytes(), [], 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(data[pos + 12 : pos + 12 + n])
        pos += 12 + n + 4
    return out


def _lightning_tag(tag: str) -> bool:
    """A metric of `self.log` (the loss, the epoch, `grad_norm`'s norms): written every `log_every_n_steps`."""
    return tag in ("train/loss", "epoch") or tag.startswith("grad_")


def tb_log_bytes(log_dir: Path, steps: range) -> dict[str, float]:
    """Bytes on disk of the event records written on ``steps`` by callbacks, and of each histogram record;
    and of one write of Lightning's `self.log` metrics (at the last step, where the fit ends).

    Figures, text and TensorBoard's layout config are left out: they are written once per fit (or a few
    times per fit at the monitors' default cadence) and would swamp a short window.
    """
    from tensorboard.compat.proto.event_pb2 import Event

    window = hist = n_hist = lightning = 0
    for path in log_dir.rglob("events.out.tfevents.*"):
        for data in _tfrecords(path):
            event = Event.FromString(data)
            values = event.summary.value
            kinds = {v.WhichOneof("value") for v in values}
            if not kinds or not kinds <= {"simple_value", "histo"}:
                continue
            if all(_lightning_tag(v.tag) for v in values):
                if event.step == steps[-1]:
                    lightning += len(data) + 16
                continue
            if event.step not in steps:
                continue
            window += len(data) + 16
            if kinds == {"histo"} and len(values) == 1:
                hist += len(data) + 16
                n_hist += 1
    return {
        "window": window,
        "lightning": lightning,
        "per_hist": hist / n_hist if n_hist else math.nan,
        "n_hist": n_hist,
    }


def _leveldb_records(path: Path) -> list[bytes]:
    """The records of a W&B `.wandb` file: a 7-byte header, then LevelDB log chunks in 32 KiB blocks.

    A chunk is crc (4), length (2), type (1: full, 2: first, 3: middle, 4: last), data; a block's last
    bytes, when fewer than a chunk header, are padding.
    """
    data, out, pos, block, parts = path.read_bytes(), [], 7, 32768, b""
    while True:
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        if pos + 7 > len(data):
            return out
        n, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            out.append(parts + chunk)
        else:  # zeros: the end of what was written
            return out


def wandb_log_bytes(run_dir: Path) -> dict[str, float]:
    """Bytes of the history records holding histograms: per record and per histogram.

    A histogram is three history items (nested keys ``[name, "_type" | "values" | "bins"]``, JSON values).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    rows = n_rows = items = 0
    names: set[str] = set()
    for path in run_dir.rglob("*.wandb"):
        for _ in range(600):  # the wandb-core service may still be writing after `finish` returns
            records = [pb.Record.FromString(data) for data in _leveldb_records(path)]
            if any(r.HasField("exit") for r in records):
                break
            time.sleep(0.1)
        for data in _leveldb_records(path):
            record = pb.Record.FromString(data)
            if not record.HasField("history"):
                continue
            hists = {it.nested_key[0] for it in record.history.item if list(it.nested_key[1:]) == ["_type"]}
            hists = {h for h in hists if h.startswith(("parameters/", "gradients/"))}
            if not hists:
                continue
            rows += len(data) + 7
            n_rows += 1
            items += sum(it.ByteSize() for it in record.history.item if it.nested_key[:1] and it.nested_key[0] in hists)
            names |= hists
    n_hist = len(names)
    return {
        "per_set": rows / n_rows if n_rows else math.nan,
        "per_hist": items / n_rows / n_hist if n_hist else math.nan,
        "n_hist": n_hist,
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- one fit
def _monitors(row: str) -> list[Callback]:
    if row in ("health", "trace"):
        from callbacks import HealthMonitor  # (not in checkouts from before issue 18)

        return [HealthMonitor(trace=row == "trace")]
    if row == "default":
        return [ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()]
    hist = CADENCE if row == "dense" else 0  # `scalars`: no histograms
    kw = {"every_n_steps": CADENCE, "histogram_every_n_steps": hist}
    return [
        ActivationMonitor(**kw),
        GradientMonitor(**kw),
        ParameterMonitor(**kw),
        UpdateRatioMonitor(every_n_steps=CADENCE),
    ]


def fit(row: str, args: argparse.Namespace, cfg: GPTConfig, root: Path, tag: str) -> dict[str, float]:
    """One fit of ``row``: seconds and steps of the window, RSS growth, log bytes."""
    torch.manual_seed(0)
    n_steps = args.warmup + 1 + args.steps
    tokens = torch.randint(0, cfg.vocab_size, ((n_steps + 2) * args.batch, cfg.block_size + 1))
    data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())  # inputs, next tokens
    loader = DataLoader(data, batch_size=args.batch)
    model = (GradNormGPT if row == "grad_norm" else GPTModule)(cfg)
    if args.compile:
        # the network, as nanoGPT does; `torch.compile(lightning_module)` compiles `training_step`, where
        # dynamo fails on `self.log` (torch 2.13, lightning 2.6: InternalTorchDynamoError in getfullargspec)
        model.model = torch.compile(model.model)  # type: ignore[assignment]
    log_dir = root / row / tag
    callbacks: list[Callback] = []
    logger: Logger
    run = None
    if row == "wandb":
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        log_dir.mkdir(parents=True)
        logger = WandbLogger(save_dir=str(log_dir), offline=True, project="bench_monitors")
        run = logger.experiment  # starts the offline run
        wandb.watch(model, log="all", log_freq=CADENCE)
    else:
        logger = TensorBoardLogger(str(root / row), name="", version=tag)
        if row in ("scalars", "dense", "default", "health", "trace"):
            callbacks = _monitors(row)
        elif row == "tb_hist":
            callbacks = [TBHistograms()]
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        precision=args.precision,
        # a long fit as far as the monitors can tell (their figure cadence follows it); the clock stops it
        # after `n_steps`, so there are no final-step histograms either
        max_steps=100_000,
        log_every_n_steps=LOG_EVERY,
        logger=logger,
        callbacks=callbacks,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    CLOCK.trainer, CLOCK.stamps, CLOCK.children_cpu = trainer, [], []
    CLOCK.first, CLOCK.last = args.warmup, args.warmup + args.steps
    with PeakRSS() as rss:
        trainer.fit(model, loader)
    if run is not None:
        import wandb

        wandb.unwatch(model)
        run.finish()
    assert len(CLOCK.stamps) == n_steps, f"{row}: expected {n_steps} optimizer steps, got {len(CLOCK.stamps)}"
    (w0, c0), (w1, c1) = CLOCK.stamps[CLOCK.first], CLOCK.stamps[CLOCK.last]
    out = {
        "wall": w1 - w0,
        "cpu": c1 - c0 + CLOCK.children_cpu[1] - CLOCK.children_cpu[0],
        "rss_peak": rss.peak,
        "rss_growth": rss.peak - rss.start,
        "dir": _dir_bytes(log_dir),
    }
    window = range(CLOCK.first + 1, CLOCK.last + 1)
    if row == "wandb":
        sizes = wandb_log_bytes(log_dir)
        # wandb writes the histograms pending at each commit: WandbLogger's, every `log_every_n_steps`
        out.update(per_1000=sizes["per_set"] * 1000 / LOG_EVERY, per_hist=sizes["per_hist"], n_hist=sizes["n_hist"])
    else:
        sizes = tb_log_bytes(log_dir, window)
        per_1000 = sizes["window"] / args.steps * 1000 + sizes["lightning"] * 1000 / LOG_EVERY
        out.update(per_1000=per_1000, per_hist=sizes["per_hist"], n_hist=sizes["n_hist"] / (args.steps // CADENCE))
    shutil.rmtree(root / row / tag, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- memory
#: one process each (`--memory`); what is attached, and whether the measured step records (see `memory_child`)
MEMORY_CASES = ("none", "imported", "unrecorded", "recorded", "update", "health", "traced")
MEMORY_LABELS = {
    "none": "no monitors",
    "imported": "no monitors; `callbacks` and matplotlib imported, one figure drawn",
    "unrecorded": "the four monitors, the measured step not recorded",
    "recorded": "the four monitors recording the measured step (scalars + histograms)",
    "update": "UpdateRatioMonitor alone recording the measured step",
    "health": "HealthMonitor() recording the measured step",
    "traced": "HealthMonitor(trace=True), the measured step traced, not recorded",
}
#: the measured step: after step 0's update made AdamW's state, and not the first recorded step (its figure)
MEASURED = 3
MIB = 2**20


def memory_config(quick: bool) -> GPTConfig:
    """Issue 20's model: 6 pre-LayerNorm blocks, width 256, 256 tokens (with batch 16)."""
    if quick:
        return GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
    return GPTConfig(n_layer=6, n_head=4, n_embd=256, block_size=256)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class StepMemory(Callback):
    """Peak memory during step ``MEASURED`` only: the kernel's RSS high-water mark is reset when it starts
    (``/proc/self/clear_refs``), read when it ends (after every callback before this one); on CUDA the
    allocator's peak likewise. Stops the fit after that step."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.out: dict[str, float] = {}

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != MEASURED:
            return
        self.out["peak_before"] = _status_kb("VmHWM") * 1024  # the process's peak over steps 0 .. MEASURED - 1
        self.out["start"] = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        if self.cuda:
            torch.cuda.synchronize()
            self.out["cuda_start"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step - 1 != MEASURED:  # (global_step counts the step just made)
            return
        self.out["peak"] = _status_kb("VmHWM") * 1024
        if self.cuda:
            torch.cuda.synchronize()
            self.out["cuda_peak"] = torch.cuda.max_memory_allocated()
        trainer.should_stop = True


def _memory_callbacks(case: str) -> list[Callback]:
    """What is attached in ``case``: recording steps 1 and 3 (every 2 steps), or none of 1 .. 999; figures only at
    the first recorded step (0 after issue 18, 1 before), never on the measured step."""
    if case in ("none", "imported"):
        return []
    from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

    n = 1000 if case in ("unrecorded", "traced") else 2
    kw = {"every_n_steps": n, "figure_every_n_steps": 0}
    if case in ("health", "traced"):
        from callbacks import HealthMonitor  # (not in checkouts from before issue 18)

        return [HealthMonitor(histogram_every_n_steps=n, trace=case == "traced", **kw)]
    if case == "update":
        return [UpdateRatioMonitor(**kw)]
    hist = {"histogram_every_n_steps": n, **kw}
    return [
        CallbackGroup(
            [ActivationMonitor(**hist), GradientMonitor(**hist), ParameterMonitor(**hist), UpdateRatioMonitor(**kw)]
        )
    ]


def memory_child(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case of `--memory`, in its own process: a fit stopped after step ``MEASURED``, its peak memory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _memory_fit(case, args)
    finally:
        torch.set_num_threads(threads)


def _memory_fit(case: str, args: argparse.Namespace) -> dict[str, Any]:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if case != "none":  # what a monitor's first figure imports and allocates, in every case but the first
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        import callbacks.figures  # noqa: F401

        fig = plt.figure()
        fig.canvas.draw()
        plt.close(fig)
    cfg = memory_config(args.quick)
    batch = 4 if args.quick else args.batch
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, ((MEASURED + 2) * batch, cfg.block_size + 1))
    loader = DataLoader(TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()), batch_size=batch)
    model = GPTModule(cfg)
    # the watched tensors: the GELU outputs (and, as large, the gradients w.r.t. them); the >= 2-D parameters
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.nbytes * batch))  # of one sequence, times batch
        for m in model.modules()
        if isinstance(m, nn.GELU)
    ]
    with torch.no_grad():
        model(loader.dataset[0][0][None])  # (1, T)
    for h in hooks:
        h.remove()
    weights = [p.nbytes for p in model.parameters() if p.dim() >= 2]
    probe = StepMemory(args.device == "cuda")
    with tempfile.TemporaryDirectory(prefix="bench_monitors_memory_") as tmp:
        trainer = L.Trainer(
            accelerator=args.device,
            devices=1,
            precision=args.precision,
            max_steps=100_000,  # a long fit as far as the monitors can tell; `StepMemory` stops it
            logger=TensorBoardLogger(tmp, name="", version="run"),
            callbacks=[*_memory_callbacks(case), probe],  # the probe last: it reads after the monitors' hooks
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, loader)
        histograms = _histogram_steps(Path(tmp))
    return {
        "case": case,
        "code": code_path(),
        **probe.out,
        "largest_watched": max([*sizes, *weights]),
        "largest_activation": max(sizes, default=0),
        "watched_weights": sum(weights),
        "histograms_at_measured": histograms.get(MEASURED, 0),
        "histogram_steps": sorted(histograms),
    }


def _histogram_steps(log_dir: Path) -> dict[int, int]:
    """Histograms written per step, read back from the event files."""
    from tensorboard.compat.proto.event_pb2 import Event

    steps: dict[int, int] = {}
    for path in log_dir.rglob("events.out.tfevents.*"):
        for data in _tfrecords(path):
            event = Event.FromString(data)
            n = sum(v.WhichOneof("value") == "histo" for v in event.summary.value)
            if n:
                steps[event.step] = steps.get(event.step, 0) + n
    return steps


def memory(args: argparse.Namespace) -> None:
    """`--memory`: each case in a fresh process, alternating over ``--repeats``; medians of the peaks."""
    cases = [c for c in MEMORY_CASES if c not in ("health", "traced") or has_health_monitor()]
    passed = ["--threads", str(args.threads), "--batch", str(args.batch), "--device", args.device]
    passed += ["--precision", args.precision] + (["--quick"] if args.quick else [])
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    load = [os.getloadavg()[0]]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)  # read by glibc when the process starts
    for rep in range(args.repeats):
        for case in cases[rep % len(cases) :] + cases[: rep % len(cases)]:
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-case", case, *passed],
                capture_output=True,
                text=True,
                check=False,
                env=env,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"memory case {case} failed:\n{proc.stderr[-3000:]}")
            x = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[case].append(x)
            load.append(os.getloadavg()[0])
            print(f"repeat {rep} {case:>10}: peak of step {MEASURED} {x['peak'] / MIB:,.0f} MiB", flush=True)
    report_memory(runs, args, load)
    if args.json:
        args.json.write_text(json.dumps({"code": code_path(), "load": load, "runs": runs}, indent=1))


def report_memory(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, load: list[float]) -> None:
    def med(case: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[case])

    cfg = memory_config(args.quick)
    first = next(iter(runs.values()))[0]
    cuda = args.device == "cuda"
    print(f"\n{_machine()}; {_versions()}; torch threads {args.threads}; {_revision()}; code: {code_path()}")
    print(
        f"model: {cfg.n_layer} pre-LayerNorm blocks, width {cfg.n_embd}, {cfg.block_size} tokens, batch"
        f" {4 if args.quick else args.batch}, AdamW, {args.device}, {args.precision}; step {MEASURED} measured"
        f" (one process a case, median of {args.repeats}); load average {min(load):.1f}-{max(load):.1f};"
        f" malloc: {f'MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}' if args.mmap_threshold else 'glibc defaults'}"
    )
    print(
        f"largest watched tensor {first['largest_watched'] / MIB:.1f} MiB (a GELU output, and the gradient w.r.t. it);"
        f" the >= 2-D parameters the UpdateRatioMonitor copies before their optimizer step:"
        f" {first['watched_weights'] / MIB:.1f} MiB\n"
    )
    base = med("unrecorded", "peak") if "unrecorded" in runs else math.nan
    unit = first["largest_watched"]
    head = "| case | peak RSS of the step (MiB) | over unrecorded (MiB) | in largest tensors | RSS at its start (MiB)"
    head += " | process peak before it (MiB) | histograms on the step |"
    if cuda:
        head += " CUDA peak of the step (MiB) | CUDA allocated at its start (MiB) |"
    print(head)
    print("|---|" + "---:|" * (head.count("|") - 2))
    for case in runs:
        peak = med(case, "peak")
        line = (
            f"| {MEMORY_LABELS[case]} | {peak / MIB:,.0f} | {(peak - base) / MIB:+,.0f} | {(peak - base) / unit:+.1f}"
            f" | {med(case, 'start') / MIB:,.0f} | {med(case, 'peak_before') / MIB:,.0f}"
            f" | {med(case, 'histograms_at_measured'):.0f} |"
        )
        if cuda:
            line += f" {med(case, 'cuda_peak') / MIB:,.0f} | {med(case, 'cuda_start') / MIB:,.0f} |"
        print(line)
    for case, xs in runs.items():
        print(
            f"  {case}: peaks "
            + ", ".join(f"{x['peak'] / MIB:,.1f}" for x in xs)
            + f" MiB; histogram steps {xs[0]['histogram_steps']}"
        )


# ---------------------------------------------------------------------------------------------- report
def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores"


def _revision() -> str:
    """The commit of the checkout `callbacks` is imported from, and whether `callbacks/` differs from it."""
    root = Path(code_path()).parent
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "callbacks"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head.stdout.strip()}" + (" with uncommitted changes in callbacks/" if dirty.strip() else "")


def _versions() -> str:
    from importlib.metadata import version  # not `import wandb`: it makes temp folders when imported

    return (
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {version('lightning')},"
        f" tensorboard {version('tensorboard')}, wandb {version('wandb')}"
    )


LABELS = {
    "none": "none",
    "scalars": "ours, scalars /10",
    "dense": "ours, dense (scalars + histograms /10)",
    "default": "ours, default",
    "wandb": 'wandb.watch(log="all", log_freq=10)',
    "grad_norm": "grad_norm every step",
    "tb_hist": "hand-written add_histogram /10",
    "health": "HealthMonitor() (nothing recorded in the window)",
    "trace": "HealthMonitor(trace=True) (every-step trace)",
}


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, clock: str, revision: str) -> None:
    med = {r: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for r, runs in results.items()}
    base = med["none"][clock] / args.steps  # seconds per step
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        per_step = med[r][clock] / args.steps
        spread = [x[clock] / args.steps / base - 1 for x in results[r]]
        rows[r] = {
            "per_step": per_step,
            "wall_per_step": med[r]["wall"] / args.steps,
            "overhead": per_step / base - 1,
            "spread": f"{100 * min(spread):+.1f} .. {100 * max(spread):+.1f}" if len(spread) > 1 else "",
            "rss": med[r]["rss_growth"],
            "per_1000": med[r]["per_1000"],
            "per_hist": med[r]["per_hist"],
            "n_hist": med[r]["n_hist"],
        }
    if "default" not in results and {"scalars", "dense"} <= results.keys():
        # 1,000 steps at log_every_n_steps=50: 18 steps with scalars, 2 with scalars and histograms
        per_logged = {r: (rows[r]["per_step"] - base) * CADENCE for r in ("scalars", "dense")}
        extra = (18 * per_logged["scalars"] + 2 * per_logged["dense"]) / 1000
        size = (18 * rows["scalars"]["per_1000"] + 2 * rows["dense"]["per_1000"]) / (1000 / CADENCE)
        rows["default"] = {
            "per_step": base + extra,
            "wall_per_step": math.nan,
            "overhead": extra / base,
            "spread": "composed",
            "rss": rows["dense"]["rss"],
            "per_1000": size,
            "per_hist": rows["dense"]["per_hist"],
            "n_hist": rows["dense"]["n_hist"],
        }
    what = "CPU" if clock == "cpu" else "wall"
    print(f"\n{_machine()}; {_versions()}; torch threads {torch.get_num_threads()}")
    print(f"device {args.device}, precision {args.precision}, compile {args.compile}; {revision} at the start")
    print(
        f"steps {args.steps} timed per fit (after {args.warmup + 1}), repeats {args.repeats};"
        f" steps/s from {what} time (medians); overhead against `none`, spread = min .. max over repeats\n"
    )
    print(
        f"| row | steps/s ({what}) | steps/s (wall) | overhead | spread (%) | RSS growth (MB)"
        " | log per 1,000 steps (KB) | histograms per logged step | bytes per histogram |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in ROWS:
        if r not in rows:
            continue
        x = rows[r]
        wall = f"{1 / x['wall_per_step']:.3f}" if x["wall_per_step"] == x["wall_per_step"] else ""
        n_hist = f"{x['n_hist']:.0f}" if x["n_hist"] == x["n_hist"] and x["n_hist"] else ""
        per_hist = f"{x['per_hist']:.0f}" if x["per_hist"] == x["per_hist"] else ""
        print(
            f"| {LABELS[r]} | {1 / x['per_step']:.3f} | {wall} | {100 * x['overhead']:+.1f} % | {x['spread']}"
            f" | {x['rss'] / 2**20:.0f} | {x['per_1000'] / 1e3:.1f} | {n_hist} | {per_hist} |"
        )
    for r, runs in results.items():
        print(f"  {r}: {what} s per window " + ", ".join(f"{x[clock]:.2f}" for x in runs))
    print(
        "paired (row / `none` of the same repeat, median over repeats): "
        + ", ".join(f"{r} {statistics.median(paired(results, r, clock)):.3f}" for r in results if r != "none")
    )


def paired(results: dict[str, list[dict[str, float]]], row: str, clock: str) -> list[float]:
    """The row's time over `none`'s in each repeat (the two fits ran back to back)."""
    return [x[clock] / n[clock] for x, n in zip(results[row], results["none"], strict=True)]


def code_path() -> str:
    """Where `callbacks` was imported from (another checkout with PYTHONPATH)."""
    import callbacks

    return str(Path(callbacks.__file__).parent)


#: the functions of ``callbacks/`` that run the model's own work for it: the attention tap's wrappers calling the
#: original attention, the loss-input check's function mode calling every torch function of a checked forward. What
#: they call outside the package is the model's training step, not the monitors' cost (file name, function name)
PASS_THROUGH = frozenset(
    {
        ("_attention.py", "scaled_dot_product_attention"),
        ("_attention.py", "multi_head_attention_forward"),
        ("_attention.py", "eager_attention_forward"),
        ("loss_input.py", "__torch_function__"),
    }
)


def seconds_in_callbacks(
    stats: pstats.Stats, package: str | None = None, pass_through: frozenset[tuple[str, str]] = PASS_THROUGH
) -> float:
    """CPU seconds spent in the measured `callbacks/` package (or in ``package``, a path prefix inside it), counted
    where it is entered from outside it (Lightning's hook calls, the modules' forward hooks, autograd's tensor
    hooks, the recorder calling a probe): each call into it once; less the model's own work that a
    :data:`PASS_THROUGH` function runs for the model (its share called from outside the package)."""
    package = package or code_path() + os.sep
    table = stats.stats  # type: ignore[attr-defined]
    inside = 0.0
    handed_on: dict[tuple, float] = {}  # a pass-through function -> cumulative seconds of what it calls outside
    for func, (_, _, _, _, callers) in table.items():
        func_in = func[0].startswith(package)
        for caller, edge in callers.items():
            caller_in = caller[0].startswith(package)
            if func_in and not caller_in:
                inside += edge[3]  # cumulative time of the calls along this edge
            elif caller_in and not func_in and (Path(caller[0]).name, caller[2]) in pass_through:
                handed_on[caller] = handed_on.get(caller, 0.0) + edge[3]
    for func, seconds in handed_on.items():
        _, _, _, total, callers = table[func]
        from_outside = sum(edge[3] for caller, edge in callers.items() if not caller[0].startswith(package))
        inside -= seconds * (from_outside / total if total > 0 else 0.0)
    return inside


def seconds_by_probe(stats: pstats.Stats) -> dict[str, float]:
    """CPU seconds inside each probe module of the measured package (``callbacks/probes/*.py``), as above."""
    probes = Path(code_path()) / "probes"
    seconds = {f.stem: seconds_in_callbacks(stats, str(f)) for f in sorted(probes.glob("*.py"))}
    return {name: s for name, s in seconds.items() if s > 0}


def has_health_monitor() -> bool:
    import callbacks

    return hasattr(callbacks, "HealthMonitor")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fit, a multiple of 10")
    parser.add_argument("--warmup", type=int, default=CADENCE, help="steps before the timed window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=ROWS, help="default: all but `default` when --steps < 500")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed on a GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--quick", action="store_true", help="a tiny model: checks that the script runs")
    parser.add_argument(
        "--small", action="store_true", help="a small GPT (4 blocks, width 128, 4 heads, context 128): issue 26's"
    )
    parser.add_argument("--profile", choices=ROWS, help="one fit of this row under cProfile, top lines")
    parser.add_argument("--memory", action="store_true", help="peak memory of a recorded step (one process a case)")
    parser.add_argument("--memory-case", choices=MEMORY_CASES, help=argparse.SUPPRESS)
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=0,
        help="--memory: glibc's MALLOC_MMAP_THRESHOLD_ in the cases' processes (e.g. 65536: every tensor of 64 KiB"
        " or more mapped on its own and given back when freed, so RSS follows live memory); 0: the allocator's default",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here (for comparisons)")
    parser.add_argument(
        "--health-parts",
        nargs="+",
        metavar="PART",
        help="the rows `health`/`trace`: build only these of HealthMonitor's parts (`diagnoses`, `transformer`,"
        " `loss_input`; default: all), e.g. `diagnoses` alone to compare with code older than issues 24 and 25",
    )
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.steps % CADENCE:
        parser.error(f"Expected --steps to be a positive multiple of {CADENCE}, but got {args.steps}.")
    if args.warmup <= 0 or args.warmup % CADENCE:
        # the first logged step (and the monitors' first figure, drawn once per fit) stays in the warm-up
        parser.error(f"Expected --warmup to be a positive multiple of {CADENCE}, but got {args.warmup}.")
    if args.health_parts:
        import callbacks.health

        unknown = sorted(set(args.health_parts) - set(callbacks.health.PARTS))
        if unknown:
            parser.error(f"Expected --health-parts among {', '.join(callbacks.health.PARTS)}, but got {unknown[0]!r}.")
    if args.memory_case:
        print(json.dumps(memory_child(args.memory_case, args)))
        return
    if args.memory:
        if not Path("/proc/self/clear_refs").exists():
            parser.error("--memory needs Linux: it resets and reads the peak RSS in /proc/self (not found here).")
        memory(args)
        return
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16) if args.quick else GPTConfig()
    if args.small:  # issue 26's model: about 85 ms a step on a 2-core AMD EPYC
        cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128)
    if args.quick:
        args.batch = 4
    rows = args.rows or [
        r
        for r in ROWS
        if (r != "default" or args.steps >= 10 * LOG_EVERY) and (r not in ("health", "trace") or has_health_monitor())
    ]
    if "none" not in rows:
        rows = ["none", *rows]
    clock = "cpu" if args.device == "cpu" else "wall"
    CLOCK.cuda = args.device == "cuda"
    for name in ("lightning.pytorch", "lightning.fabric", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    revision = _revision()  # what `callbacks` was when imported, as near as git can tell
    with _benchmark_scope(args) as root:
        if args.profile:
            CLOCK.profiler = cProfile.Profile(time.process_time)  # CPU time: others share the machine
            x = fit(args.profile, args, cfg, root, "profile")
            print(f"{args.profile}: {x['cpu']:.2f} s CPU / {x['wall']:.2f} s wall for {args.steps} steps, profiled")
            text = io.StringIO()
            stats = pstats.Stats(CLOCK.profiler, stream=text)
            inside = seconds_in_callbacks(stats)
            print(
                f"inside callbacks/ (entered from outside it): {inside:.3f} s CPU of the window's {x['cpu']:.2f} s"
                f" ({100 * inside / x['cpu']:.2f} %); code: {code_path()}"
            )
            by_probe = seconds_by_probe(stats)
            print("of which in the probes: " + ", ".join(f"{name} {s:.3f} s" for name, s in by_probe.items()))
            if args.json:
                args.json.write_text(json.dumps({"code": code_path(), "profile": args.profile, "inside": inside, **x}))
            stats.sort_stats("tottime").print_stats(25)  # torch ops show as built-in methods
            stats.sort_stats("cumulative").print_stats(r"callbacks/|bench_monitors|wandb_torch|tensorboard", 25)
            print(text.getvalue().replace(str(Path(torch.__file__).parents[1]) + "/", ""))
            CLOCK.profiler = None
            return
        results: dict[str, list[dict[str, float]]] = {r: [] for r in rows}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            order = rows[rep % len(rows) :] + rows[: rep % len(rows)]  # rotated, alternating
            for r in order:
                t0 = time.perf_counter()
                results[r].append(fit(r, args, cfg, root, f"r{rep}"))
                x = results[r][-1]
                print(
                    f"repeat {rep} {r:>9}: {x[clock]:.2f} s {clock} / {x['wall']:.2f} s wall for"
                    f" {args.steps} steps (fit {time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
                load.append(os.getloadavg()[0])
        report(results, args, clock, revision)
        print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}; code: {code_path()}")
        if args.json:
            record = {"code": code_path(), "clock": clock, "load": load, "results": results}
            args.json.write_text(json.dumps(record, indent=1))


@contextlib.contextmanager
def _benchmark_scope(args: argparse.Namespace) -> Iterator[Path]:
    """A temp folder for the logs; the clock hook, torch threads, W&B env and warnings, undone on exit."""
    threads = torch.get_num_threads()
    if args.health_parts:  # checked by `main`
        import callbacks.health as health

        every_part = health.PARTS
        health.PARTS = tuple(args.health_parts)  # read when a HealthMonitor is built
    keys = ("WANDB_SILENT", "WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")
    env = {k: os.environ.get(k) for k in keys}
    handle = register_optimizer_step_post_hook(CLOCK)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="bench_monitors_") as tmp:
        warnings.simplefilter("ignore")
        os.environ.update(WANDB_SILENT="true", WANDB_MODE="offline")
        for k in keys[2:]:
            os.environ[k] = str(Path(tmp) / "wandb_dir")
        if args.device == "cpu":
            torch.set_num_threads(args.threads)
        try:
            yield Path(tmp)
        finally:
            handle.remove()
            if "wandb" in sys.modules:
                import wandb

                wandb.teardown()  # before the folder goes: the wandb-core service writes in it
            torch.set_num_threads(threads)
            if args.health_parts:
                health.PARTS = every_part
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    main()
