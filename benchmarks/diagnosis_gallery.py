"""The diagnosis gallery: sick and healthy runs, and whether ``HealthMonitor`` names the right problem and layer.

    export MAKEMORE_NAMES=/work/shared/data/names.txt     # else the corpus is downloaded once
    python benchmarks/diagnosis_gallery.py              # 28 runs, ~9 min on one thread of a shared 2-core EPYC
    python benchmarks/diagnosis_gallery.py --lr-sweep   # and 16 learning-rate sweep runs, not scored (~7 min more)
    python benchmarks/diagnosis_gallery.py --runs "saturated tanh" "corrupted"     # runs whose name contains these
    python benchmarks/diagnosis_gallery.py --quick      # 300 MLP / 200 GPT steps, one seed: ~1.5 min (a smoke test)

Every run is a fresh ``Trainer.fit`` on CPU with one ``HealthMonitor()`` at its defaults (scalars every 50 steps,
the every-step trace on), a ``CSVLogger``, one intra-op thread, no validation; runs are sequential. Two families:

- **the lecture's names MLP** (``configs/lecture/*.yaml``, built as ``train.py fit`` builds them), 3,000 steps: its
  failure modes (an over-confident output layer, a saturated tanh, a deep tanh stack at PyTorch's default init:
  no Kaiming gain, no BatchNorm; a learning rate 10x too high or 100x too low, with SGD and with AdamW; ReLUs killed
  by a too-high learning rate) and its healthy nets (the lecture's Kaiming, BatchNorm and deep BatchNorm configs,
  and the Kaiming net with ReLUs) over three seeds each (the init seed and the batch order);
- **a small GPT** (pre-LayerNorm decoder in plain torch, 4 blocks, width 64, 4 heads, context 32, untied head,
  GPT-2 init; batch 16) trained char-level on the same names (joined by ``.``, random windows), AdamW at nanoGPT's
  lr 1e-3 with warm-up and cosine decay, 1,000 steps: a learning-rate jump (x30 from step 600 on), one corrupted
  batch (step 600 is random tokens), an outlier feature (one channel of block 2's MLP scaled x100 at init), and
  healthy runs over three seeds.

Each run lists the diagnoses it must get, each a judge's key prefix and the layer it must name, and the secondary
diagnoses that are true of it too (e.g. the lecture's original net is over-confident *and* saturated; a learning
rate jumped x30 is too high afterwards). A finding is a *problem* or a *note* (expected, nothing to change); only
problems are counted:

- a problem finding is **correct** when it matches one of its run's expected or secondary diagnoses (key prefix and
  layer); every other problem finding, any problem on a healthy run among them, is a **false positive**;
- **precision** = correct problem findings / all problem findings, over every run;
- **recall** = expected diagnoses matched by at least one problem finding naming the right layer / all expected
  diagnoses, over every sick run (secondary diagnoses count for precision only, never for recall).

Writes ``benchmarks/results/diagnosis_gallery.md`` and ``.json`` (``--out``): the table (run, expected, found,
layer right?), precision and recall, the margins of every judge's threshold (the healthy runs' worst value against
the sick runs' values, measured by a judge that only watches), and with ``--lr-sweep`` where the learning-rate line
falls against the loss; with the machine, the commit, the command and the run time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning.pytorch as L  # noqa: E402
from bench_monitors import GPT, GPTConfig  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from callbacks import HealthMonitor  # noqa: E402
from callbacks.judges.base import Finding, Judge, Readouts  # noqa: E402
from callbacks.judges.lr import typical_ratio  # noqa: E402
from callbacks.judges.spikes import robust_z  # noqa: E402

SEEDS = (2147483647, 1, 2)  # the lecture's seed, then two more (init and batch order)


# ---------------------------------------------------------------------------------------------- the GPT
class GPTModule(L.LightningModule):
    """The GPT trained the usual way: AdamW (weight decay on matrices), linear warm-up, cosine decay to lr/10; the
    peak lr 1e-3 of nanoGPT's small character-level GPT (``config/train_shakespeare_char.py``).

    Args:
        lr: the peak learning rate.
        warmup: warm-up steps.
        lr_jump: ``(step, factor)``: the learning rate multiplied by ``factor`` from ``step`` on (a schedule bug).
        outlier: ``(block, channel, scale)``: that channel of the block's MLP (its ``c_fc`` row) scaled at init.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        steps: int,
        lr: float = 1e-3,
        warmup: int = 100,
        lr_jump: tuple[int, float] | None = None,
        outlier: tuple[int, int, float] | None = None,
    ) -> None:
        super().__init__()
        self.model = GPT(cfg, tied=False)  # an untied head, std 0.02: the first softmax is near uniform
        self.steps, self.lr, self.warmup, self.lr_jump = steps, lr, warmup, lr_jump
        if outlier is not None:
            block, channel, scale = outlier
            with torch.no_grad():  # one feature of the MLP's hidden layer, `scale` times the others
                self.model.h[block].mlp.c_fc.weight[channel] *= scale

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, T) each
        logits = self.model(x)  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.95))

        def factor(step: int) -> float:
            if step < self.warmup:
                f = (step + 1) / self.warmup
            else:
                t = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
                f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
            if self.lr_jump is not None and step >= self.lr_jump[0]:
                f *= self.lr_jump[1]
            return f

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def names_stream() -> tuple[Tensor, int]:
    """The training split's names joined by ``.`` (``.emma.olivia.``...) as token ids, and the vocabulary size."""
    from lightning_makemore.data import NamesDataModule, split_names

    dm = NamesDataModule()
    train, _, _ = split_names(dm.names(), dm.split_seed)
    ids = [0]
    for word in train:
        ids += [dm.vocab.stoi[c] for c in word] + [0]
    return torch.tensor(ids), len(dm.vocab.itos)


def gpt_batches(stream: Tensor, steps: int, batch: int, T: int, seed: int, corrupt: int | None, vocab: int):
    """One epoch of ``steps`` batches of random windows (x, y shifted by one); batch ``corrupt`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - T - 1, (steps, batch), generator=g)
    windows = stream[starts.unsqueeze(-1) + torch.arange(T + 1)]  # (steps, batch, T + 1)
    if corrupt is not None:  # a corrupted shard: the bytes of that batch are noise
        windows[corrupt] = torch.randint(0, vocab, windows[corrupt].shape, generator=g)
    x, y = windows[..., :-1].reshape(-1, T), windows[..., 1:].reshape(-1, T)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


# ---------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Expect:
    """A diagnosis a run must (or may) get: a judge's key prefix (any of ``keys``) and the layer it must name.

    ``where``: the finding's ``where`` exactly (``""``: the whole model); ``check``: a test of the finding for what
    its key and layer cannot say (a spike's first mover and its lead); ``what``: the diagnosis in words.
    """

    what: str
    keys: tuple[str, ...]
    where: str | None = None
    check: Callable[[Finding], bool] | None = None

    def matches_key(self, f: Finding) -> bool:
        return any(f.key.startswith(k) for k in self.keys)

    def layer_right(self, f: Finding) -> bool:
        return (self.where is None or f.where == self.where) and (self.check is None or self.check(f))


#: what a spike finding says of its first mover: "the <stat> of `<name>`, <n> steps before the loss" / "at the same"
MOVER = re.compile(
    r"the (update:data ratio|gradient norm|output RMS) of `([^`]+)`, (?:(\d+) steps? before|at the same)"
)


def mover(f: Finding) -> tuple[str, str, int] | None:
    """``(statistic, layer, steps before the loss)`` of a spike finding's first mover, or None (nothing moved)."""
    m = MOVER.search(f.message)
    return (m.group(1), m.group(2), int(m.group(3) or 0)) if m else None


def update_ratio_first(f: Finding) -> bool:
    """An lr jump: some layer's update:data ratio left its range before the loss (the update of a step changes
    the loss of the next step at the earliest)."""
    m = mover(f)
    return m is not None and m[0] == "update:data ratio" and m[2] >= 1


def with_the_loss(f: Finding) -> bool:
    """A corrupted batch: a gradient norm moved at the same step as the loss, and nothing before."""
    m = mover(f)
    return m is not None and m[0] == "gradient norm" and m[2] == 0


@dataclass
class Run:
    name: str
    family: str  # "mlp" or "gpt"
    build: Callable[[int], tuple[L.LightningModule, Any]]  # steps -> (module, datamodule or train loader)
    expected: list[Expect] = field(default_factory=list)  # empty: a healthy run
    secondary: list[Expect] = field(default_factory=list)
    steps: int = 3000
    spike_at: int | None = None  # GPT: the step of the lr jump or the corrupted batch (scaled by --quick)


def mlp(stage: str, seed: int = SEEDS[0], **overrides: Any) -> Callable[[int], tuple[Any, Any]]:
    """A lecture stage as ``train.py fit --config configs/lecture/<stage>.yaml`` builds it, with ``overrides``."""

    def build(steps: int) -> tuple[Any, Any]:
        from lecture_table import load_config

        from lightning_makemore.data import NamesDataModule
        from lightning_makemore.module import MakemoreModule

        config = load_config(stage)
        L.seed_everything(seed, verbose=False)  # PyTorch's default init draws from the global generator
        dm = NamesDataModule(**{**config["data"], "seed": seed})
        dm.setup("fit")
        model = {**config["model"], "init_seed": seed, **overrides}
        return MakemoreModule(vocab=list(dm.vocab.itos), block_size=dm.block_size, **model), dm

    return build


GPT_CFG = dict(block_size=32, n_layer=4, n_head=4, n_embd=64)
GPT_BATCH = 16


def gpt(seed: int = SEEDS[0], corrupt: float | None = None, **kwargs: Any) -> Callable[[int], tuple[Any, Any]]:
    """The GPT with ``kwargs`` (``GPTModule``'s); ``corrupt``: the fraction of the fit at which a batch is noise."""

    def build(steps: int) -> tuple[Any, Any]:
        stream, vocab = names_stream()
        L.seed_everything(seed, verbose=False)
        cfg = GPTConfig(vocab_size=vocab, **GPT_CFG)
        args = dict(kwargs)
        if "lr_jump" in args:  # given as a fraction of the fit
            at, factor = args["lr_jump"]
            args["lr_jump"] = (int(at * steps), factor)
        module = GPTModule(cfg, steps, warmup=max(1, steps // 10), **args)
        at = int(corrupt * steps) if corrupt is not None else None
        return module, gpt_batches(stream, steps, GPT_BATCH, cfg.block_size, seed, at, vocab)

    return build


TANH0, TANH4, HEAD = "net.blocks.0.act (Tanh)", "net.blocks.4.act (Tanh)", "net.head"
LR_MODEL = Expect("learning rate too high/low for the model", ("lr/model", "lr/high", "lr/low"), "")
ANY_LR = Expect("the learning rate, for the model or a layer", ("lr/",))
SATURATED0 = Expect("tanh saturated", ("init/saturation/", "saturation/"), TANH0)
OVERCONFIDENT = Expect("init loss far above ln 27", ("init/loss",), HEAD)


def runs() -> list[Run]:
    """The gallery, sick runs first (see the module docstring)."""
    out = [
        Run(
            "original: over-confident output and saturated tanh",
            "mlp",
            mlp("original"),
            [OVERCONFIDENT, SATURATED0],
            [ANY_LR],
        ),
        Run(
            "over-confident output (tanh fix, output layer randn)",
            "mlp",
            mlp("tanh_fix", last_layer_scale=None),
            [OVERCONFIDENT],
            # the confidently wrong logits make every gradient large while they are squashed (the hockey stick)
            [Expect("large updates while the logits are squashed", ("lr/",))],
        ),
        Run("saturated tanh (naive hidden init, softmax fix)", "mlp", mlp("softmax_fix"), [SATURATED0], [ANY_LR]),
        Run(
            "deep tanh, no Kaiming gain, no BatchNorm",
            "mlp",
            mlp("deep", init="pytorch", batchnorm=False, logits_batchnorm=False, last_layer_scale=0.01),
            [
                Expect("signal shrinking with depth", ("init/vanishing/",), TANH4),
                Expect("gradients vanishing toward the input", ("init/gradients/vanish",), TANH0),
            ],
            [
                Expect("vanishing gradients", ("vanishing/",)),
                Expect("the embedding's gradients vanished", ("init/grad_to_data/",), "net.embedding.weight"),
            ],
        ),
        Run("Kaiming tanh net, SGD lr 1.0 (10x too high)", "mlp", mlp("kaiming", lr=1.0), [LR_MODEL], [ANY_LR]),
        Run("deep BatchNorm net, SGD lr 1.0 (10x too high)", "mlp", mlp("deep", lr=1.0), [LR_MODEL], [ANY_LR]),
        Run("deep BatchNorm net, SGD lr 1e-3 (100x too low)", "mlp", mlp("deep", lr=1e-3), [LR_MODEL], [ANY_LR]),
        Run(
            "Kaiming tanh net, AdamW lr 3e-2 (30x the usual 1e-3)",
            "mlp",
            mlp("kaiming", optimizer="adamw", lr=3e-2),
            [LR_MODEL],
            [ANY_LR],
        ),
        Run(
            "BatchNorm net, AdamW lr 1e-5 (100x too low)",
            "mlp",
            mlp("batchnorm", optimizer="adamw", lr=1e-5),
            [LR_MODEL],
            [ANY_LR],
        ),
        Run(
            "dying ReLUs (Kaiming ReLU net, SGD lr 2.0)",
            "mlp",
            mlp("kaiming", activation="relu", lr=2.0),
            [Expect("dead ReLU units", ("dead/",), "net.blocks.0.act (ReLU)")],
            [ANY_LR],
        ),
        Run(
            "GPT, learning rate x30 from step 600",
            "gpt",
            gpt(lr_jump=(0.6, 30.0)),
            [Expect("loss spike: an update:data ratio left its range first", ("spike/",), check=update_ratio_first)],
            [
                ANY_LR,
                Expect("the later spikes of the same instability", ("spike/",)),
                Expect("GELU units pushed below zero by the jump", ("dead/",)),
            ],
            steps=1000,
        ),
        Run(
            "GPT, one corrupted batch (step 600)",
            "gpt",
            gpt(corrupt=0.6),
            [Expect("loss spike: gradients moved with the loss, nothing before", ("spike/",), check=with_the_loss)],
            steps=1000,
        ),
        Run(
            "GPT, outlier feature (block 2's MLP, one channel x100)",
            "gpt",
            gpt(outlier=(2, 7, 100.0)),
            [Expect("outlier activations", ("outlier/",), "model.h.2.mlp.gelu (GELU)")],
            # the scaled row makes that weight matrix large for its gradients
            [Expect("its weights large for their gradients", ("init/grad_to_data/",), "model.h.2.mlp.c_fc.weight")],
            steps=1000,
        ),
    ]
    for stage in ("kaiming", "batchnorm", "deep"):
        out += [Run(f"healthy: lecture's {stage}, seed {s}", "mlp", mlp(stage, seed=s)) for s in SEEDS]
    out += [Run(f"healthy: Kaiming ReLU net, SGD lr 0.1, seed {s}", "mlp", relu(s)) for s in SEEDS]
    out += [Run(f"healthy: GPT, seed {s}", "gpt", gpt(seed=s), steps=1000) for s in SEEDS]
    return out


def relu(seed: int) -> Callable[[int], tuple[Any, Any]]:
    return mlp("kaiming", seed=seed, activation="relu")


def sweeps() -> list[Run]:
    """Learning-rate sweeps (``--lr-sweep``), not counted in precision or recall: where the learning-rate judges draw
    the line against where the loss is best, for SGD and AdamW, on the MLPs and the GPT."""
    out = [Run(f"sweep: deep BatchNorm net, SGD lr {lr:g}", "mlp", mlp("deep", lr=lr)) for lr in (0.03, 0.1, 0.3, 1.0)]
    out += [
        Run(f"sweep: Kaiming tanh net, AdamW lr {lr:g}", "mlp", mlp("kaiming", optimizer="adamw", lr=lr))
        for lr in (1e-3, 1e-2, 3e-2)
    ]
    out += [
        Run(f"sweep: BatchNorm net, AdamW lr {lr:g}", "mlp", mlp("batchnorm", optimizer="adamw", lr=lr))
        for lr in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)
    ]
    out += [Run(f"sweep: GPT, AdamW lr {lr:g}", "gpt", gpt(lr=lr), steps=1000) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
    return out


# ---------------------------------------------------------------------------------------------- measuring
def held(series: list[float], patience: int, low: bool = False) -> float:
    """The most extreme value ``series`` held for ``patience`` consecutive points (what a judge with that patience
    sees): the max over windows of their min (``low``: the min over windows of their max)."""
    if len(series) < patience:
        return math.nan
    windows = [series[i : i + patience] for i in range(len(series) - patience + 1)]
    return min(max(w) for w in windows) if low else max(min(w) for w in windows)


class Spy(Judge):
    """Keeps what the judges threshold on, for the margins table: it reads every readout and finds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.m: dict[str, Any] = {}
        self.loss: list[float] = []  # the every-step trace's loss
        self.series: dict[str, dict[str, list[float]]] = {}  # statistic -> layer -> its value on recorded steps
        self.median_ratio: list[float] = []  # the median parameter's update ratio at the peak lr so far

    def _add(self, stat: str, layer: str, value: float) -> None:
        self.series.setdefault(stat, {}).setdefault(layer, []).append(value)

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        if step == 0:
            self._init(readouts)
        acts = readouts.get("activation")
        for layer in acts.layers if acts is not None else []:
            s = layer.summary
            if s.count:
                rms = math.sqrt(max(s.sum_squares, 0.0) / s.count)
                self._add("peak", layer.label, max(abs(s.min), abs(s.max)) / rms if rms > 0 else 0.0)
            if layer.saturation is not None:
                self._add("saturation", layer.label, layer.saturation)
            if layer.dead is not None:
                self._add("dead " + (layer.gradient_below_zero or ""), layer.label, layer.dead)
        grads = readouts.get("activation_grad")
        if grads is not None:
            stds = [g.summary.std for g in grads.layers if g.summary.count and math.isfinite(g.summary.std)]
            if len(stds) > 1 and max(stds) > 0:
                self._add("grad spread", "", min(stds) / max(stds))
        ratios = readouts.get("update_ratio")
        if ratios is not None:
            shifted = []
            for n, v in ratios.ratios.items():
                lrs = [lr for lr in ratios.lrs.get(n, []) if math.isfinite(lr) and lr > 0]
                if math.isfinite(v):
                    shifted.append(v + (math.log10(max(lrs) / lrs[-1]) if lrs else 0.0))
            if shifted:
                self.median_ratio.append(statistics.median(shifted))
        trace = readouts.get("trace")
        if trace is not None and "loss" in trace.columns:
            i = trace.columns.index("loss")
            self.loss += [row[i] for row in trace.rows]
        return []

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        self.observe(step, {"trace": readouts["trace"]} if "trace" in readouts else {})
        ratios = readouts.get("update_ratio")
        if ratios is not None:
            typical = {
                n: r for n, h in ratios.history.items() if (r := typical_ratio(h, ratios.lrs.get(n, []))) is not None
            }
            if typical:
                self.m["lr: typical update ratio, median parameter"] = statistics.median(typical.values())
                self.m["typical update ratio of each parameter"] = typical
        return []

    def _init(self, readouts: Readouts) -> None:
        loss = readouts.get("loss")
        if loss is not None and loss.classes and math.isfinite(loss.value):
            self.m["init: loss / ln C"] = loss.value / math.log(loss.classes)
        acts = readouts.get("activation")
        if acts is not None:
            layers = sorted(acts.layers, key=lambda layer: layer.summary.order)
            sats = [layer.saturation for layer in layers if layer.saturation is not None]
            if sats:
                self.m["init: saturation, max layer"] = max(sats)
            by_kind: dict[str, list[float]] = {}
            for layer in layers:
                if layer.kind is not None and layer.summary.std > 0:
                    by_kind.setdefault(layer.label.rsplit("(", 1)[-1].rstrip(")"), []).append(layer.summary.std)
            for stds in by_kind.values():
                if len(stds) >= 3:
                    self.m["init: activation std, last / first of a stack"] = stds[-1] / stds[0]
        grads = readouts.get("activation_grad")
        if grads is not None:
            layers = [g for g in sorted(grads.layers, key=lambda g: -g.summary.order) if g.summary.std > 0]
            if len(layers) >= 3:
                self.m["init: gradient std, first / last layer"] = layers[0].summary.std / layers[-1].summary.std
        params = readouts.get("param_grad")
        if params is not None:
            ratios = {p.name: p.grad_to_data for p in params.params if math.isfinite(p.grad_to_data)}
            if len(ratios) >= 3:
                median = statistics.median(ratios.values())
                small = {p.name for p in params.params if p.data.std < 0.05}
                large = [r / median for n, r in ratios.items() if n not in small]
                if large:
                    self.m["init: grad:data, largest / median (weights not small)"] = max(large)
                self.m["init: grad:data, median / smallest"] = median / min(ratios.values())

    def finish(self) -> dict[str, Any]:
        """The measurements of the fit: the init's, and what each judge's condition held at its worst."""
        m = dict(self.m)
        for stat, name, patience, low in (
            ("peak", "max|y| / RMS, held 3 logged steps, max layer", 3, False),
            ("saturation", "saturation, held 3 logged steps, max layer", 3, False),
            ("dead none", "dead ReLU units, held 3 logged steps, max layer", 3, False),
            ("dead some", "GELU units never positive, held 3 logged steps, max layer", 3, False),
            ("grad spread", "activation-grad std, smallest / largest layer, held 3 logged steps", 3, True),
        ):
            values = [held(v, patience, low) for v in self.series.get(stat, {}).values()]
            values = [v for v in values if math.isfinite(v)]
            if values:
                m[name] = min(values) if low else max(values)
        if len(self.median_ratio) >= 10:
            m["update ratio at the peak lr, median parameter, highest held 10 logged steps"] = held(
                self.median_ratio, 10
            )
            m["update ratio at the peak lr, median parameter, lowest held 10 logged steps"] = held(
                self.median_ratio, 10, low=True
            )
        window = 100
        zs = [
            robust_z(self.loss[i], past)[0]
            for i in range(window, len(self.loss))
            if len(past := [v for v in self.loss[i - window : i] if math.isfinite(v)]) >= window // 2
            and math.isfinite(self.loss[i])
        ]
        if zs:
            m["loss robust z, max step"] = max(zs)
        tail = [v for v in self.loss[-max(1, len(self.loss) // 10) :] if math.isfinite(v)]
        if tail:
            m["train loss, last tenth of the fit"] = statistics.fmean(tail)
        return m


def fit(run: Run, steps: int, tmp: Path) -> dict[str, Any]:
    """Trains one run with a ``HealthMonitor``; returns its findings, measurements and time."""
    module, data = run.build(steps)
    hm = HealthMonitor()
    assert hm.report is not None
    hm.report.console = False  # the gallery prints its own table
    spy = Spy()
    spy.record = hm.diagnoses.record
    hm.diagnoses.judges.append(spy)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        log_every_n_steps=50,
        limit_val_batches=0,
        logger=CSVLogger(str(tmp), name=re.sub(r"\W+", "_", run.name)),
        callbacks=[hm],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if run.family == "mlp":
            trainer.fit(module, datamodule=data)
        else:
            trainer.fit(module, train_dataloaders=data)
    seconds = time.perf_counter() - t0
    findings = [f for f in hm.findings if f is not None]
    return {"findings": findings, "measured": spy.finish(), "seconds": seconds, "steps": steps}


# ---------------------------------------------------------------------------------------------- judging
def assess(run: Run, findings: list[Finding]) -> dict[str, Any]:
    """Which expected diagnoses were found with the right layer, and which problem findings are correct."""
    problems = [f for f in findings if f.severity == "problem"]
    expected = []
    for e in run.expected:
        keyed = [f for f in problems if e.matches_key(f)]
        right = [f for f in keyed if e.layer_right(f)]
        expected.append({"what": e.what, "found": bool(keyed), "layer_right": bool(right)})
    verdicts = []
    for f in problems:
        ok = any(e.matches_key(f) and e.layer_right(f) for e in [*run.expected, *run.secondary])
        verdicts.append(ok)
    return {
        "expected": expected,
        "problems": len(problems),
        "correct": sum(verdicts),
        "false_positives": [f.text for f, ok in zip(problems, verdicts, strict=True) if not ok],
    }


def short(f: Finding) -> str:
    """A finding in a table cell: its key (less the layer's name), its layer and, for a spike, its first mover."""
    name = f.where.split(" (")[0]
    key = f.key.removesuffix(f"/{name}") if name else f.key
    where = f" `{f.where}`" if f.where else ""
    m = mover(f) if f.key.startswith("spike/") else None
    extra = f" (first: {m[0]} of `{m[1]}`, {m[2]} steps before)" if m else ""
    return f"{key}{where}{extra}".replace("|", "\\|")


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | expected | found: problems (notes) | layer right? |", "|---|---|---|---|"]
    for name, r in results.items():
        a = r["assessment"]
        expected = "<br>".join(e["what"] for e in a["expected"]) or "healthy: no problem"
        problems = [short(f) for f in r["findings"] if f.severity == "problem"]
        notes = [short(f) for f in r["findings"] if f.severity != "problem"]
        found = "<br>".join(problems) or "no problem"
        if notes:
            found += "<br>(notes: " + "; ".join(notes) + ")"
        if a["expected"]:
            right = "<br>".join(
                "yes" if e["layer_right"] else ("wrong layer" if e["found"] else "missed") for e in a["expected"]
            )
        else:
            right = "yes (none)" if not a["problems"] else f"{a['problems']} false positive(s)"
        if a["expected"] and a["false_positives"]:
            right += f"<br>+{len(a['false_positives'])} false positive(s)"
        lines.append(f"| {name} | {expected} | {found} | {right} |")
    return "\n".join(lines)


def scores(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    problems = sum(r["assessment"]["problems"] for r in results.values())
    correct = sum(r["assessment"]["correct"] for r in results.values())
    expected = [e for r in results.values() for e in r["assessment"]["expected"]]
    hits = sum(e["layer_right"] for e in expected)
    return {
        "problem findings": problems,
        "correct": correct,
        "precision": correct / problems if problems else 1.0,
        "expected diagnoses": len(expected),
        "found with the right layer": hits,
        "recall": hits / len(expected) if expected else 1.0,
    }


def thresholds() -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """For the margins table, read from the judges and the monitors' defaults: statistic -> (the judge and its
    threshold, the side the healthy runs' worst value is on ("max", "min", or "range"), the sick runs it must catch
    (substrings of their names))."""
    import inspect

    from callbacks import ActivationMonitor, GradientMonitor, UpdateRatioMonitor
    from callbacks.judges import health, init, lr
    from callbacks.judges.outliers import OutlierActivations
    from callbacks.judges.spikes import LossSpikes

    def default(cls: type, arg: str) -> Any:
        return inspect.signature(cls).parameters[arg].default

    sat, dead = default(ActivationMonitor, "saturation_warning"), default(ActivationMonitor, "dead_warning")
    low, high = default(UpdateRatioMonitor, "low"), default(UpdateRatioMonitor, "high")
    advice = f"> {lr.TARGET + lr.TOLERANCE:g} or < {lr.TARGET - lr.TOLERANCE:g}"
    return {
        "init: loss / ln C": (f"InitCheck: > {init.LOSS_RATIO:g}", "max", ("over-confident",)),
        "init: saturation, max layer": (f"InitCheck: > {init.SATURATION:g}", "max", ("saturated tanh",)),
        "saturation, held 3 logged steps, max layer": (f"Saturation: > {sat:g}", "max", ("saturated tanh",)),
        "init: activation std, last / first of a stack": (f"InitCheck: < {init.VANISHING:g}", "min", ("no Kaiming",)),
        "init: gradient std, first / last layer": (f"InitCheck: < {init.GRAD_VANISHING:g}", "min", ("no Kaiming",)),
        "init: grad:data, largest / median (weights not small)": (
            f"InitCheck: > {init.GRAD_TO_DATA_SPREAD:g}",
            "max",
            (),
        ),
        "init: grad:data, median / smallest": (
            f"InitCheck: > {init.GRAD_TO_DATA_LOW:g}",
            "max",
            ("no Kaiming", "outlier"),
        ),
        "activation-grad std, smallest / largest layer, held 3 logged steps": (
            f"VanishingGradients: < {default(GradientMonitor, 'vanishing_ratio'):g}",
            "min",
            (),
        ),
        "lr: typical update ratio, median parameter": (f"LearningRateAdvice: {advice}", "range", ("lr ",)),
        "update ratio at the peak lr, median parameter, highest held 10 logged steps": (
            f"LearningRate: > {high:g}",
            "max",
            ("too high", "30x"),
        ),
        "update ratio at the peak lr, median parameter, lowest held 10 logged steps": (
            f"LearningRate: < {low:g}",
            "min",
            ("too low",),
        ),
        "dead ReLU units, held 3 logged steps, max layer": (f"DeadUnits: > {dead:g}", "max", ("dying ReLUs",)),
        "GELU units never positive, held 3 logged steps, max layer": (
            f"DeadUnits: > {max(dead, health.SOFT_DEAD):g} (GELU-like)",
            "max",
            ("x30",),
        ),
        "max|y| / RMS, held 3 logged steps, max layer": (
            f"OutlierActivations: > {OutlierActivations().ratio:g}",
            "max",
            ("outlier",),
        ),
        "loss robust z, max step": (f"LossSpikes: >= {LossSpikes().z:g}", "max", ("x30", "corrupted")),
        "train loss, last tenth of the fit": ("(no judge: the training loss, per-batch mean)", "range", ("lr ",)),
    }


def margins(results: dict[str, dict[str, Any]]) -> str:
    """Each judged statistic: its threshold, the healthy runs' worst value, and the sick runs it must catch."""
    lines = ["| statistic | threshold | healthy runs (worst) | the sick runs it must catch |", "|---|---|---|---|"]

    def fmt(v: Any) -> str:
        return "[" + ", ".join(f"{x:.3g}" for x in v) + "]" if isinstance(v, list) else f"{v:.3g}"

    for stat, (threshold, side, sick_runs) in thresholds().items():
        healthy = [(r["measured"][stat], n) for n, r in results.items() if not r["sick"] and stat in r["measured"]]
        flat = [(x, n) for v, n in healthy for x in (v if isinstance(v, list) else [v]) if math.isfinite(x)]
        if not flat:
            worst = ""
        elif side == "range":
            worst = f"{min(flat)[0]:.3g} .. {max(flat)[0]:.3g}"
        else:
            value, name = max(flat) if side == "max" else min(flat)
            worst = f"{side} {value:.3g} ({name.removeprefix('healthy: ')})"
        sick = [
            f"{n}: {fmt(r['measured'][stat])}"
            for n, r in results.items()
            if r["sick"] and stat in r["measured"] and any(k in n for k in sick_runs)
        ]
        lines.append(f"| {stat} | {threshold} | {worst} | {'<br>'.join(sick)} |")
    return "\n".join(lines)


def sweep_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The learning-rate sweeps: each run's typical update ratio (what the lr judges read), its loss, its problems."""
    lines = [
        "## Learning-rate sweeps (not scored)",
        "",
        "Where the learning-rate judges draw the line (the lecture's: a typical update:data ratio above -2 is too"
        " high, below -4 too low) against the training loss these short fits reach (per-batch mean over their last"
        " tenth, lower is better; 3,000 and 1,000 steps, where the lecture chose its rate for 200,000).",
        "",
        "| run | typical update ratio (log10) | train loss | problem findings |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["measured"]
        typical = m.get("lr: typical update ratio, median parameter", math.nan)
        loss = m.get("train loss, last tenth of the fit", math.nan)
        problems = ", ".join(f.key for f in r["findings"] if f.severity == "problem") or "none"
        lines.append(f"| {name.removeprefix('sweep: ')} | {typical:.2f} | {loss:.3f} | {problems} |")
    return [*lines, ""]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = f"torch {torch.__version__}, Lightning {L.__version__}"
    return f"{cpu}, {os.cpu_count()} cores (1 intra-op thread used), {versions}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "callbacks"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + (" (callbacks/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    all_runs = runs()
    parser.add_argument("--runs", nargs="*", metavar="RUN", help="runs whose name contains one of these strings")
    parser.add_argument("--quick", action="store_true", help="300 MLP / 200 GPT steps, one seed: a smoke test")
    parser.add_argument("--lr-sweep", action="store_true", help="also the learning-rate sweeps (~7 min, not scored)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diagnosis_gallery")
    args = parser.parse_args(argv)
    selected = [r for r in all_runs if not args.runs or any(s in r.name for s in args.runs)]
    if args.quick:
        selected = [r for r in selected if "seed" not in r.name or f"seed {SEEDS[0]}" in r.name]
    swept = sweeps() if args.lr_sweep else []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    results: dict[str, dict[str, Any]] = {}
    swept_results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="diagnosis_gallery_") as tmp:
            for run in [*selected, *swept]:
                steps = run.steps if not args.quick else (300 if run.family == "mlp" else 200)
                r = fit(run, steps, Path(tmp))
                r["sick"] = bool(run.expected)
                r["assessment"] = assess(run, r["findings"])
                (results if run in selected else swept_results)[run.name] = r
                a = r["assessment"]
                print(
                    f"{run.name}: {a['problems']} problems ({a['correct']} correct), {r['seconds']:.0f} s", flush=True
                )
    finally:
        torch.set_num_threads(threads)
    total = time.perf_counter() - t0
    s = scores(results)
    command = "python benchmarks/diagnosis_gallery.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join(
        [
            "# Diagnosis gallery: does `HealthMonitor` name the right problem, in the right layer?",
            "",
            f"`{command.strip()}` on {machine()}; commit {commit()}; {total / 60:.1f} min in all.",
            "",
            "How to read it: each run lists the diagnoses it must get (a judge's key prefix and the layer it must"
            " name) and, in `benchmarks/diagnosis_gallery.py`, the secondary ones that are true of it too. Only"
            " problem findings count; notes (expected, nothing to change) are shown in brackets.",
            "",
            "- a problem finding is **correct** when it matches one of its run's expected or secondary diagnoses"
            " (key prefix and layer); any other problem finding, e.g. any problem on a healthy run, is a **false"
            " positive**;",
            "- **precision** = correct problem findings / all problem findings;",
            "- **recall** = expected diagnoses found by a problem finding naming the right layer / all expected"
            " diagnoses (secondary ones count for precision only).",
            "",
            f"**Precision {s['precision']:.0%}** ({s['correct']} of {s['problem findings']} problem findings correct),"
            f" **recall {s['recall']:.0%}** ({s['found with the right layer']} of {s['expected diagnoses']} expected"
            " diagnoses found with the right layer).",
            "",
            table(results),
            "",
            "## Margins: what each judge thresholds on, healthy runs against sick ones",
            "",
            margins(results),
            "",
            "Reading the margins: a judge is calibrated when its healthy runs' worst value and its sick runs sit on"
            " either side of its threshold with room to spare. The learning-rate rows have the least room: the"
            " lecture's line at -2 (10x its healthy 1e-3) falls between a healthy AdamW GPT (nanoGPT's lr 1e-3: its"
            " weights start at 0.02 and Adam's steps are about the lr) and the deep BatchNorm net at 10x the lecture's"
            " lr (BatchNorm lets the weights grow, so the ratio rises by only half a decade). Both are on the line"
            " rather than across it: the update ratio alone cannot tell them apart, and neither can the loss these"
            " short fits reach (see the sweeps). The AdamW run that is too high is at 30x the usual 1e-3, not 10x: at"
            " 10x (1e-2) these MLPs train as well as at any rate of the sweep in 3,000 steps, so calling it too high"
            " would be wrong.",
            "",
            *(sweep_table(swept_results) if swept_results else []),
            "Run times: "
            + ", ".join(f"{n.split(' (')[0]} {r['seconds']:.0f} s" for n, r in {**results, **swept_results}.items())
            + f"; {total:.0f} s in all.",
            "",
        ]
    )
    print(md)
    false = [f"{n}: {fp}" for n, r in results.items() for fp in r["assessment"]["false_positives"]]
    if false:
        print("False positives:\n" + "\n".join(false))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    payload = {
        "command": command.strip(),
        "machine": machine(),
        "commit": commit(),
        "seconds": total,
        "scores": s,
        "runs": {
            n: {
                "steps": r["steps"],
                "seconds": r["seconds"],
                "sick": r["sick"],
                "assessment": r["assessment"],
                "findings": [
                    {"key": f.key, "step": f.step, "where": f.where, "severity": f.severity, "text": f.text}
                    for f in r["findings"]
                ],
                "measured": r["measured"],
            }
            for n, r in {**results, **swept_results}.items()
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    return payload


if __name__ == "__main__":
    main()
