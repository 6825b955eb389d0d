"""The small-scale proxies of Wortsman et al. (2023) on CPU: a learning-rate sweep of a small GPT, with and without
qk-layernorm and z-loss, and where the Transformer judges of ``HealthMonitor`` fire.

The model: a pre-LayerNorm GPT without biases (as in the paper), 2 blocks, width 64, 4 heads, context 32, a
32-token vocabulary, weights at N(0, 0.02); options ``qk_layernorm`` (a LayerNorm on q and on k per head, before
q·k: Dehghani et al. 2023) and ``z_loss`` (``z_loss * log Z**2`` added to the loss, PaLM's 1e-4). The data: a
fixed random second-order Markov chain (each token is one of two tokens that the previous two choose), so the
model must attend to the previous two positions; its entropy, ``ln 2 = 0.69`` nats, is the floor of the loss
(``ln 32 = 3.47``: a uniform guess). AdamW (betas 0.9, 0.95, ε 1e-8, no weight decay), linear warm-up over 30
steps and cosine decay, batch 32, 300 steps, one intra-op thread; ``HealthMonitor(every_n_steps=10)`` on every
run (its Transformer probes record every 10 steps).

Runs: the learning rates ``LRS`` (three decades) x {plain, qk-layernorm} x {no z-loss, z-loss 1e-4} x
``SEEDS``; and the ε pair: ε raised to 1e-1 (it dominates every parameter's ``sqrt(v_hat)``) against its healthy
twin at ε 1e-8, at lr 1e-2. Each run records its final loss (mean of the last 20 steps), its loss curve, the
judges' findings with their steps, and the step at which its loss *degrades*: the first step from which its loss
(mean over 10 steps) stays 0.1 above its qk-layernorm twin's (same lr, z-loss and seed), so "fired at step 20,
degraded at step 60" says how early the warning comes.

    python benchmarks/transformer_sweep.py            # the whole sweep: ~12 min on 2 shared CPU cores
    python benchmarks/transformer_sweep.py --quick    # 4 runs of 120 steps: checks the script runs (~1 min)

Writes ``benchmarks/results/transformer_sweep.md`` (tables) and ``docs/img/transformer_lr_sensitivity.png``
(final loss against the learning rate, per variant: the paper's figure 1) and
``docs/img/transformer_attention_logits.png`` (the largest attention logit over training, per lr, with and
without qk-layernorm); ``--quick`` writes them under ``--out`` only.

:func:`zoo_cases` gives these runs to the fault zoo (``benchmarks/fault_zoo.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import HealthMonitor

ROOT = Path(__file__).resolve().parent.parent
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
SEEDS = (0, 1)
VOCAB, CONTEXT = 32, 32
TRANSFORMER_KEYS = ("attention_logits/", "attention_entropy/", "output_logits", "adam_eps/")


# ---------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Config:
    vocab: int = VOCAB
    context: int = CONTEXT
    width: int = 64
    heads: int = 4
    layers: int = 2
    qk_layernorm: bool = False  # LayerNorm on q and k per head (Dehghani et al. 2023)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        head = cfg.width // cfg.heads
        self.q_norm = nn.LayerNorm(head) if cfg.qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(head) if cfg.qk_layernorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        q, k = self.q_norm(q), self.k_norm(k)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.out(self.act(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.context, cfg.width)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)


class SweepModule(L.LightningModule):
    """The GPT, its loss (+ z-loss), AdamW with warm-up and cosine decay."""

    def __init__(self, cfg: Config, lr: float, z_loss: float = 0.0, eps: float = 1e-8, steps: int = 300) -> None:
        super().__init__()
        self.model, self.lr, self.z_loss, self.eps, self.steps = GPT(cfg), lr, z_loss, eps, steps
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (idx,) = batch
        logits = self.model(idx[:, :-1])  # (B, T, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        if self.z_loss:
            loss = loss + self.z_loss * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, betas=(0.9, 0.95), eps=self.eps, weight_decay=0.0)
        warm = 30

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0
            return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, self.steps) / self.steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def markov_data(n: int = 4096, seed: int = 0) -> Tensor:
    """``n`` sequences of ``CONTEXT + 1`` tokens from a fixed random second-order Markov chain (entropy ln 2)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, VOCAB, (VOCAB, VOCAB, 2), generator=g)  # (prev2, prev1) -> two possible next tokens
    seq = torch.zeros(n, CONTEXT + 1, dtype=torch.long)
    seq[:, :2] = torch.randint(0, VOCAB, (n, 2), generator=g)
    for t in range(2, CONTEXT + 1):
        pick = torch.randint(0, 2, (n,), generator=g)
        seq[:, t] = table[seq[:, t - 2], seq[:, t - 1], pick]
    return seq


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    lr: float
    qk_layernorm: bool
    z_loss: float
    seed: int
    eps: float = 1e-8
    steps: int = 300
    final: float = math.nan  # mean loss of the last 20 steps
    losses: list[float] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)  # {"key", "step", "where", "text"}
    logit_max: list[tuple[int, float]] = field(default_factory=list)  # (step, max over layers)
    entropy_share: list[tuple[int, float]] = field(default_factory=list)  # (step, min over layers)
    log_z: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def name(self) -> str:
        parts = [f"lr={self.lr:g}", "qk-ln" if self.qk_layernorm else "plain"]
        if self.z_loss:
            parts.append(f"z-loss={self.z_loss:g}")
        if self.eps != 1e-8:
            parts.append(f"eps={self.eps:g}")
        return f"{' '.join(parts)} seed={self.seed}"

    def fired(self, prefix: str) -> int | None:
        """The first step a finding whose key starts with ``prefix`` was reported (None: never)."""
        steps = [f["step"] for f in self.findings if f["key"].startswith(prefix)]
        return min(steps) if steps else None


class Readings(Callback):
    """Keeps the Transformer probes' readouts of each recorded step (the curves of the figures)."""

    def __init__(self, monitor: HealthMonitor, run: Run) -> None:
        self.monitor, self.run = monitor, run
        self.seen: set[int] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        attention, logits = (p.latest for p in self.monitor.transformer.probes[:2])
        if attention is not None and attention.step not in self.seen:
            self.seen.add(attention.step)
            self.run.logit_max.append((attention.step, max(x.logit_max for x in attention.layers)))
            self.run.entropy_share.append((attention.step, min(x.entropy_share for x in attention.layers)))
            if logits is not None:
                self.run.log_z.append((logits.step, logits.log_z_mean))


def train(run: Run, log_dir: Path) -> Run:
    """Fits ``run`` with ``HealthMonitor(every_n_steps=10)`` and fills its results."""
    torch.manual_seed(run.seed)
    torch.set_num_threads(1)
    cfg = Config(qk_layernorm=run.qk_layernorm)
    module = SweepModule(cfg, run.lr, run.z_loss, run.eps, run.steps)
    data = markov_data()
    loader = DataLoader(TensorDataset(data), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    monitor = HealthMonitor(every_n_steps=10, histogram_every_n_steps=0, figure_every_n_steps=0, report=False)
    t = L.Trainer(
        max_steps=run.steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=CSVLogger(str(log_dir), name="sweep"),
        callbacks=[monitor, Readings(monitor, run)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, loader)
    run.seconds = time.perf_counter() - start
    run.losses = module.losses
    run.final = sum(module.losses[-20:]) / 20
    run.findings = [
        {"key": f.key, "step": f.step, "where": f.where, "text": f.text}
        for f in monitor.findings
        if f.key.startswith(TRANSFORMER_KEYS)
    ]
    return run


def degraded_at(run: Run, twin: Run, margin: float = 0.1, window: int = 10) -> int | None:
    """The first step from which ``run``'s loss (mean over ``window`` steps) stays ``margin`` above ``twin``'s."""
    a = [sum(run.losses[i : i + window]) / window for i in range(0, len(run.losses) - window + 1, window)]
    b = [sum(twin.losses[i : i + window]) / window for i in range(0, len(twin.losses) - window + 1, window)]
    worse = [x > y + margin for x, y in zip(a, b, strict=False)]
    for i in range(len(worse)):
        if all(worse[i:]):
            return i * window
    return None


def sweep(quick: bool, log_dir: Path, progress: Callable[[str], None] = print) -> list[Run]:
    """Every run of the sweep (``quick``: lr 1e-2 and 1e-1, plain and qk-layernorm, 120 steps, one seed)."""
    if quick:
        runs = [Run(lr, qk, 0.0, 0, steps=120) for lr in (1e-2, 1e-1) for qk in (False, True)]
    else:
        runs = [Run(lr, qk, z, s) for z in (0.0, 1e-4) for qk in (False, True) for lr in LRS for s in SEEDS]
        runs += [Run(1e-2, False, 0.0, s, eps=eps) for s in SEEDS for eps in (1e-1,)]
    for run in runs:
        train(run, log_dir)
        fired = sorted({f["key"].split("/")[0] for f in run.findings})
        progress(f"{run.name}: final loss {run.final:.3f}, fired {fired or '-'} ({run.seconds:.0f} s)")
    return runs


def twin_of(run: Run, runs: list[Run]) -> Run | None:
    """The qk-layernorm twin of a plain run (same lr, z-loss, ε and seed)."""
    for r in runs:
        if r.qk_layernorm and (r.lr, r.z_loss, r.seed, r.eps) == (run.lr, run.z_loss, run.seed, run.eps):
            return r
    return None


# ---------------------------------------------------------------------------------------------- the fault zoo
def zoo_cases(quick: bool = False, log_dir: Path | None = None) -> list[dict[str, Any]]:
    """The sweep's runs as fault-zoo cases, for ``benchmarks/fault_zoo.py``.

    Runs the sweep (``quick``: 4 short runs) and returns one dict per run:

    - ``"name"``: e.g. ``"lr=0.1 plain seed=0"``;
    - ``"expected"``: the set of finding-key prefixes that should fire (``"attention_logits"``,
      ``"attention_entropy"``, ``"adam_eps"``): attention findings for a plain run whose loss degrades against its
      qk-layernorm twin (see :func:`degraded_at`), ``adam_eps`` for a run with ε raised to 1e-1; empty for a run
      that trains well;
    - ``"fired"``: the set of those prefixes that did fire (from ``HealthMonitor``'s findings);
    - ``"findings"``: the findings as ``{"key", "step", "where", "text"}`` dicts;
    - ``"final_loss"``: mean of the last 20 steps; ``"degraded_at"``: the step its loss degraded (None: never).

    A case is correct when ``fired == expected``; each finding's ``where`` names the layer (``h.0.attn``) or the
    parameter.
    """
    import tempfile

    runs = sweep(quick, Path(log_dir or tempfile.mkdtemp()), progress=lambda _: None)
    return [_case(r, runs) for r in runs]


def _case(run: Run, runs: list[Run]) -> dict[str, Any]:
    twin = twin_of(run, runs) if not run.qk_layernorm else None
    degraded = degraded_at(run, twin) if twin is not None else None
    expected: set[str] = set()
    if degraded is not None and run.eps == 1e-8:
        expected = {"attention_logits", "attention_entropy"}
    if run.eps != 1e-8:
        expected = {"adam_eps"}
    fired = {f["key"].split("/")[0] for f in run.findings}
    return {
        "name": run.name,
        "expected": expected,
        "fired": fired,
        "findings": run.findings,
        "final_loss": run.final,
        "degraded_at": degraded,
    }


# ---------------------------------------------------------------------------------------------- report
def figures(runs: list[Run], img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    variants = [(False, 0.0, "plain"), (True, 0.0, "qk-layernorm"), (False, 1e-4, "z-loss"), (True, 1e-4, "both")]
    for qk, z, label in variants:
        chosen = [r for r in runs if r.qk_layernorm == qk and r.z_loss == z and r.eps == 1e-8]
        lrs = sorted({r.lr for r in chosen})
        if not lrs:
            continue
        mean = [sum(r.final for r in chosen if r.lr == lr) / sum(1 for r in chosen if r.lr == lr) for lr in lrs]
        ax.plot(lrs, mean, marker="o", label=label, linestyle="--" if z else "-")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final loss (mean of the last 20 steps, over seeds)")
    ax.axhline(math.log(2), color="grey", lw=0.8, ls=":")
    ax.set_title("learning-rate sensitivity: a small GPT, with and without qk-layernorm")
    ax.legend()
    fig.tight_layout()
    out.append(img / "transformer_lr_sensitivity.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seed0 = [r for r in runs if r.seed == 0 and r.z_loss == 0.0 and r.eps == 1e-8]
    for r in seed0:
        if r.logit_max:
            steps, values = zip(*r.logit_max, strict=True)
            ax.plot(steps, values, ls="-" if not r.qk_layernorm else "--", label=r.name.replace(" seed=0", ""))
    ax.set_yscale("log")
    ax.axhline(50, color="red", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("max |q·k|/√d over layers")
    ax.set_title("attention logits over training (dashed: qk-layernorm; red: the judge's 50)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.append(img / "transformer_attention_logits.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)
    return out


def report(runs: list[Run], seconds: float) -> str:
    cases = [_case(r, runs) for r in runs]
    lines = [
        "# Transformer instabilities on CPU: a learning-rate sweep of a small GPT",
        "",
        f"`python benchmarks/transformer_sweep.py`: {len(runs)} runs, {seconds / 60:.1f} min on a shared 2-core CPU.",
        "",
        "| run | final loss | degraded at (vs its qk-layernorm twin) | fired (first step) | expected | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r, c in zip(runs, cases, strict=True):
        fired = ", ".join(f"{k} ({r.fired(k)})" for k in sorted(c["fired"])) or "-"
        expected = ", ".join(sorted(c["expected"])) or "-"
        deg = c["degraded_at"] if c["degraded_at"] is not None else "-"
        ok = "yes" if c["fired"] == c["expected"] else "**no**"
        lines.append(f"| {r.name} | {r.final:.3f} | {deg} | {fired} | {expected} | {ok} |")
    right = sum(c["fired"] == c["expected"] for c in cases)
    lines += ["", f"Cases right: {right} of {len(cases)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 runs of 120 steps (the CI check)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the repo's files)")
    args = parser.parse_args()
    import tempfile

    start = time.perf_counter()
    runs = sweep(args.quick, Path(tempfile.mkdtemp()))
    seconds = time.perf_counter() - start
    out = args.out or (ROOT / "benchmarks" / "results" if not args.quick else Path(tempfile.mkdtemp()))
    img = (ROOT / "docs" / "img") if args.out is None and not args.quick else out
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer_sweep.md").write_text(report(runs, seconds))
    (out / "transformer_sweep.json").write_text(json.dumps([asdict(r) for r in runs]))
    for path in figures(runs, img):
        print("wrote", path)
    print("wrote", out / "transformer_sweep.md")


if __name__ == "__main__":
    main()
