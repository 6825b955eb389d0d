"""Reproduce the loss table of makemore part 3: every stage of the lecture, each trained from its own config.

    python benchmarks/lecture_table.py                        # all six stages, 200,000 steps each, 2 processes
    python benchmarks/lecture_table.py --steps 3000 --stages original batchnorm --out /tmp/quick   # a quick look
    python benchmarks/lecture_table.py --from-json            # rewrite the table and figures from the saved JSON

Each stage is `configs/lecture/<stage>.yaml` run through `lightning.Trainer` exactly as
`python train.py fit --config configs/lecture/<stage>.yaml` would (same model, data and seeds), one process per
stage and one intra-op thread per process, `--jobs` processes at a time. For every stage it measures:

- loss and tanh saturation (share of |h| > 0.97, averaged over the tanh layers) at step 0: the freshly built net,
  in train mode, on the whole training split (the lecture's 27.88 is on its first batch of 32);
- train / val / test loss at the end, on whole splits, in eval mode (the lecture's `split_loss`);
- the parameter count and the wall time of `fit` (noisy: the machine is shared).

Writes `<out>/lecture_table.md` and `.json`, and the figures `<img>/lecture_loss_curves.png`,
`<img>/lecture_activations_init.png` and `<img>/lecture_gradients_init.png`. The two distribution figures come
from `callbacks.figures.plot_distributions` (the monitors' own figure code), for the lecture's deep net shape
(5 x [Linear(100) -> tanh]) under three inits: naive randn, Kaiming, Kaiming + BatchNorm.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "lecture"
SATURATION = 0.97  # the lecture's plotting threshold for "saturated" tanh outputs

# The lecture's numbers (../shared/LECTURE.md): train / val / test loss, step-0 loss, share of |h| > 0.97.
LECTURE: dict[str, dict[str, Any]] = {
    "original": {"label": "original (naive init)", "train": 2.1245, "val": 2.1682, "loss0": 27.88, "sat0": "~70 %"},
    "softmax_fix": {"label": "fix softmax (W2 x 0.01)", "train": 2.07, "val": 2.13, "loss0": 3.32, "sat0": "~70 %"},
    "tanh_fix": {"label": "fix tanh (W1 x 0.2)", "train": 2.0356, "val": 2.1027, "sat0": "~5 %"},
    "kaiming": {"label": "Kaiming init", "train": 2.0377, "val": 2.1070, "sat0": "18-21 %"},
    "batchnorm": {"label": "BatchNorm", "train": 2.0674, "val": 2.1057, "sat0": "~3 %"},
    "deep": {"label": "deep 5-layer BatchNorm net", "train": 2.000, "val": 2.077, "test": 2.081, "params": 47024},
}
STAGES = tuple(LECTURE)
TOLERANCE = 0.015  # target: every stage's val loss within this of the lecture's


# ---------------------------------------------------------------------------------------------------------
# building a stage


def load_config(stage: str) -> dict[str, Any]:
    """The stage's LightningCLI config as a dict with `model`, `data` and `trainer` sections."""
    with open(CONFIGS / f"{stage}.yaml") as f:
        config = yaml.safe_load(f)
    return {section: dict(config.get(section) or {}) for section in ("model", "data", "trainer")}


def build_stage(stage: str, **model_overrides: Any):
    """(MakemoreModule with its net built, set-up NamesDataModule) for a stage, as `train.py fit` builds them."""
    from lightning_makemore.data import NamesDataModule
    from lightning_makemore.module import MakemoreModule

    config = load_config(stage)
    dm = NamesDataModule(**config["data"])
    dm.setup("fit")
    model = {**config["model"], **model_overrides}
    module = MakemoreModule(vocab=list(dm.vocab.itos), block_size=dm.block_size, **model)
    return module, dm


@torch.no_grad()
def init_stats(net: torch.nn.Module, X: torch.Tensor, Y: torch.Tensor) -> tuple[float, float]:
    """(loss, share of tanh outputs with |h| > 0.97) of a fresh net in train mode, as at step 0."""
    net.train()
    loss = F.cross_entropy(net(X), Y).item()
    saturated = [(h.abs() > SATURATION).float().mean().item() for h in net.activations(X)]
    return loss, sum(saturated) / len(saturated)


# ---------------------------------------------------------------------------------------------------------
# training one stage (runs in a worker process)


def _recorder(stage: str, total: int, progress: Any, bucket: int):
    """A callback that keeps the train loss averaged over `bucket` steps, val losses, and reports progress."""
    import lightning as L

    class Recorder(L.Callback):
        def __init__(self) -> None:
            self.train: list[tuple[int, float]] = []
            self.val: list[tuple[int, float]] = []
            self._sum, self._n = 0.0, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._sum += float(outputs["loss"])
            self._n += 1
            step = trainer.global_step
            if self._n == bucket:
                self.train.append((step - bucket // 2, self._sum / self._n))
                self._sum, self._n = 0.0, 0
            if step % 500 == 0 or step == total:
                progress[stage] = step

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if "val/loss" in trainer.callback_metrics:
                self.val.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    return Recorder()


def run_stage(stage: str, steps: int | None, progress: Any) -> dict[str, Any]:
    """Train one stage from its config; return its step-0 statistics, final losses, curves and wall time."""
    torch.set_num_threads(1)
    import logging
    import warnings

    import lightning as L

    from lightning_makemore.module import split_loss

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banners per stage
    warnings.filterwarnings("ignore")

    module, dm = build_stage(stage)
    trainer_cfg = load_config(stage)["trainer"]
    total = steps or trainer_cfg.get("max_steps", 200_000)
    X, Y = dm.splits["train"]
    loss0, sat0 = init_stats(module.net, X, Y)
    recorder = _recorder(stage, total, progress, bucket=max(1, total // 200))
    trainer = L.Trainer(
        max_steps=total,
        max_epochs=-1,
        accelerator="cpu",
        devices=1,
        logger=False,  # the recorder keeps the curves; no event files to clean up
        callbacks=[recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    losses = {split: split_loss(module.net, *dm.splits[split]) for split in ("train", "val", "test")}
    progress[stage] = total
    return {
        "stage": stage,
        "steps": total,
        "loss0": loss0,
        "sat0": sat0,
        "params": sum(p.numel() for p in module.net.parameters()),
        **losses,
        "wall_s": wall,
        "curve_train": [(s, round(v, 4)) for s, v in recorder.train],
        "curve_val": [(s, round(v, 4)) for s, v in recorder.val],
    }


# ---------------------------------------------------------------------------------------------------------
# running them all, with a progress display


def _fmt_duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def run_all(stages: list[str], steps: int | None, jobs: int) -> dict[str, dict[str, Any]]:
    """Train `stages` in `jobs` processes at a time, showing each stage's step count while they run."""
    totals = {s: steps or load_config(s)["trainer"].get("max_steps", 200_000) for s in stages}
    ctx = mp.get_context("spawn")
    tty = sys.stderr.isatty()
    results: dict[str, dict[str, Any]] = {}
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        progress = manager.dict({s: 0 for s in stages})
        # the deep net is the slowest: start it first so the pool ends together
        order = sorted(stages, key=lambda s: s != "deep")
        futures: dict[str, Future] = {s: pool.submit(run_stage, s, steps, progress) for s in order}
        start, last_print = time.perf_counter(), 0.0
        while True:
            done = all(f.done() for f in futures.values())
            now = time.perf_counter()
            if tty or done or now - last_print >= 30:
                parts = []
                for s in stages:
                    mark = "done" if futures[s].done() else f"{progress[s] / totals[s]:4.0%}"
                    parts.append(f"{s} {mark}")
                line = f"[{_fmt_duration(now - start)}] " + " | ".join(parts)
                print(("\r" + line) if tty else line, end="" if tty and not done else "\n", file=sys.stderr, flush=True)
                last_print = now
            if done:
                break
            time.sleep(1.0)
        for s in stages:
            results[s] = futures[s].result()  # re-raises a worker's error here
    return results


# ---------------------------------------------------------------------------------------------------------
# the table


def _num(value: Any, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def write_table(results: dict[str, dict[str, Any]], out: Path, total_wall: float | None) -> str:
    """Markdown table of the measured numbers next to the lecture's; also writes it and the JSON to `out`."""
    rows = [
        "| stage | train | val (lecture) | Δ val | test | step-0 loss (lecture) | "
        "step-0 \\|h\\|>0.97 (lecture) | params | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, r in results.items():
        ref = LECTURE[stage]
        delta = r["val"] - ref["val"]
        ok = "✓" if abs(delta) <= TOLERANCE else "✗"
        rows.append(
            f"| {ref['label']} | {r['train']:.4f} ({_num(ref.get('train'))}) | {r['val']:.4f} ({ref['val']:.4f}) "
            f"| {delta:+.4f} {ok} | {r['test']:.4f} | {r['loss0']:.2f} ({_num(ref.get('loss0'), '.2f')}) "
            f"| {r['sat0']:.1%} ({ref.get('sat0', '—')}) | {r['params']:,} | {_fmt_duration(r['wall_s'])} |"
        )
    steps = {r["steps"] for r in results.values()}
    notes = [
        "",
        f"Steps per stage: {', '.join(f'{s:,}' for s in sorted(steps))}, batch 32, SGD 0.1 → 0.01; "
        "losses on whole splits (182,625 / 22,655 / 22,866 examples).",
        "Step-0 numbers: the fresh net in train mode on the whole training split (the lecture's 27.88 is on "
        "its first batch of 32); saturation averaged over the tanh layers. "
        f"✓: val within {TOLERANCE} of the lecture. Wall: `fit` on one core of a shared 2-core machine.",
    ]
    if total_wall is not None:
        notes.append(f"Whole table: {_fmt_duration(total_wall)}.")
    text = "\n".join(rows + notes) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lecture_table.md").write_text(text)
    payload = {"lecture": LECTURE, "tolerance": TOLERANCE, "total_wall_s": total_wall, "results": results}
    (out / "lecture_table.json").write_text(json.dumps(payload, indent=1) + "\n")
    return text


# ---------------------------------------------------------------------------------------------------------
# figures


def _agg_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_loss_curves(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Train loss (mean over each 1/200 of the run) and val loss (dots, each epoch) of every stage, one plot."""
    fig = _agg_figure((10, 5))
    ax = fig.add_subplot(1, 1, 1)
    for stage, r in results.items():
        steps, losses = zip(*r["curve_train"], strict=True)
        (line,) = ax.plot(steps, losses, linewidth=1.2, label=f"{LECTURE[stage]['label']}: val {r['val']:.4f}")
        if r["curve_val"]:
            vsteps, vlosses = zip(*r["curve_val"], strict=True)
            ax.plot(vsteps, vlosses, "o", markersize=2.5, color=line.get_color())
    ax.set_ylim(1.9, 2.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("makemore part 3: train loss (lines, mean per 1,000 steps) and val loss (dots) per stage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    fig.savefig(path)


INIT_FIGURE_STAGES = {  # figure panel -> stage config whose init it uses, on the deep net's shape
    "naive randn init (softmax fix on)": "softmax_fix",
    "Kaiming init (5/3)/sqrt(fan_in)": "kaiming",
    "Kaiming init + BatchNorm": "batchnorm",
}


def init_distributions(batch_size: int = 32, seed: int = 0) -> dict[str, tuple[dict, dict]]:
    """{panel: ({layer: tanh output}, {layer: grad of the loss w.r.t. it})} at init, for the figures.

    The net is the lecture's deep shape (5 x [Linear(100) -> tanh]) with each stage's init, so every panel
    shows five layers like the lecture's pictures; one batch of `batch_size` training examples (the
    lecture's 32, so the gradient scale compares with its plots).
    """
    out = {}
    for panel, stage in INIT_FIGURE_STAGES.items():
        module, dm = build_stage(stage, n_layers=5, n_hidden=100)
        net = module.net.train()
        X, Y = dm.splits["train"]
        ix = torch.randint(0, len(X), (batch_size,), generator=torch.Generator().manual_seed(seed))
        acts: dict[str, torch.Tensor] = {}

        def keep(name: str, store: dict[str, torch.Tensor] = acts):
            def hook(_module, _inputs, output):
                output.retain_grad()
                store[name] = output

            return hook

        handles = [
            block.act.register_forward_hook(keep(f"layer {i} (Tanh)")) for i, block in enumerate(net.blocks, start=1)
        ]
        F.cross_entropy(net(X[ix]), Y[ix]).backward()
        for handle in handles:
            handle.remove()
        out[panel] = ({k: v.detach() for k, v in acts.items()}, {k: v.grad for k, v in acts.items()})
    return out


def _stack_figures(figures: list, path: Path) -> None:
    """Save figures of equal size one above the other as one PNG."""
    import numpy as np
    from matplotlib.image import imsave

    from callbacks.figures import figure_to_array

    imsave(path, np.concatenate([figure_to_array(f) for f in figures], axis=0))


def plot_init_figures(img: Path) -> list[Path]:
    """The lecture's before/after pictures: activation and gradient distributions at init, per init regime."""
    from callbacks.figures import plot_distributions

    dists = init_distributions()
    act_figs, grad_figs = [], []
    for panel, (acts, grads) in dists.items():
        act_figs.append(
            plot_distributions(
                acts, f"activation distribution at init: {panel}", saturation_threshold=SATURATION, xlabel="tanh output"
            )
        )
        grad_figs.append(plot_distributions(grads, f"gradient distribution at init: {panel}", xlabel="dloss/dh"))
    paths = [img / "lecture_activations_init.png", img / "lecture_gradients_init.png"]
    _stack_figures(act_figs, paths[0])
    _stack_figures(grad_figs, paths[1])
    return paths


# ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run")
    parser.add_argument("--steps", type=int, default=None, help="override every config's max_steps")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="table and JSON")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img", help="PNG figures")
    parser.add_argument(
        "--from-json", action="store_true", help="no training: table and figures from <out>/lecture_table.json"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.steps is not None and args.steps < 1:
        parser.error(f"Expected --steps >= 1, but got {args.steps}.")
    if not os.environ.get("MAKEMORE_NAMES"):
        print("note: $MAKEMORE_NAMES is not set; the corpus is read from the download cache", file=sys.stderr)

    if args.from_json:
        saved = json.loads((args.out / "lecture_table.json").read_text())
        results, total_wall = saved["results"], saved["total_wall_s"]
    else:
        start = time.perf_counter()
        results = run_all(args.stages, args.steps, args.jobs)
        total_wall = time.perf_counter() - start
    print(write_table(results, args.out, total_wall))
    args.img.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(results, args.img / "lecture_loss_curves.png")
    for path in [args.img / "lecture_loss_curves.png", *plot_init_figures(args.img)]:
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
