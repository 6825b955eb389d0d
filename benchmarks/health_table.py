"""Calibrates the monitors' health warnings: which warnings each lecture run and each broken run raises.

    MAKEMORE_NAMES=/work/shared/data/names.txt python benchmarks/health_table.py --steps 3000
    python benchmarks/health_table.py --steps 3000 --runs deep deep_lr_high     # a few runs only

Each run is a stage of ``configs/lecture/`` built as ``train.py fit`` builds it (``lecture_table.build_stage``),
trained for ``--steps`` optimizer steps with the four monitors in one ``CallbackGroup`` at the default cadence
(``log_every_n_steps=50``), one thread, no validation. The healthy runs are the lecture's own nets; the broken ones
change one thing: naive init, a too-high or too-low learning rate, ReLU units killed by a too-high learning rate.
Prints the run -> warnings table as markdown (the README's) and writes it, with the raw scalars' extremes per run,
to ``--out`` (``benchmarks/results/health_table.{md,json}``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: run -> (stage config, model overrides, expected: "healthy" or the cause the warning must name)
RUNS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tanh_fix": ("tanh_fix", {}, "healthy"),
    "kaiming": ("kaiming", {}, "healthy"),
    "batchnorm": ("batchnorm", {}, "healthy"),
    "deep": ("deep", {}, "healthy"),
    "ReLU, lr 0.1": ("kaiming", {"activation": "relu"}, "healthy"),
    "original (naive init)": ("original", {}, "saturated tanh"),
    "softmax_fix (naive hidden init)": ("softmax_fix", {}, "saturated tanh"),
    "deep, lr 2.0 (too high)": ("deep", {"lr": 2.0}, "learning rate too high"),
    "deep, lr 1e-4 (too low)": ("deep", {"lr": 1e-4}, "learning rate too low"),
    "ReLU, lr 2.0 (dead units)": ("kaiming", {"activation": "relu", "lr": 2.0}, "dead ReLU units"),
}


def run(name: str, steps: int, tmp: Path) -> dict[str, Any]:
    """Trains one run; returns its warnings (the monitors' messages) and the extremes of its scalars."""
    import lightning.pytorch as L
    from lecture_table import build_stage
    from lightning.pytorch.loggers import CSVLogger

    from callbacks import (
        ActivationMonitor,
        CallbackGroup,
        GradientMonitor,
        HealthWarning,
        ParameterMonitor,
        UpdateRatioMonitor,
    )

    stage, overrides, expected = RUNS[name]
    module, dm = build_stage(stage, **overrides)
    monitors = [ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()]
    logger = CSVLogger(str(tmp), name=stage, version=len(list(tmp.glob(f"{stage}/*"))))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        log_every_n_steps=50,
        limit_val_batches=0,
        logger=logger,
        callbacks=[CallbackGroup(monitors)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    # each problem is warned once per fit, as a `HealthWarning` (the public way a user sees them)
    messages = [str(w.message) for w in caught if issubclass(w.category, HealthWarning)]
    extremes: dict[str, list[float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key != "step" and key != "epoch":
                    v = float(value)
                    lo, hi = extremes.get(key, [v, v])
                    extremes[key] = [min(lo, v), max(hi, v)]
    other = sorted({str(w.message).splitlines()[0][:120] for w in caught if not issubclass(w.category, HealthWarning)})
    return {"expected": expected, "warnings": messages, "extremes": extremes, "seconds": seconds, "other": other}


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | expected | warnings raised |", "|---|---|---|"]
    for name, r in results.items():
        raised = "<br>".join(m.replace("|", "\\|") for m in r["warnings"]) or "none"
        lines.append(f"| {name} | {r['expected']} | {raised} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "health_table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            results[name] = run(name, args.steps, Path(tmp))
            print(f"{name}: {len(results[name]['warnings'])} warnings, {results[name]['seconds']:.0f} s", flush=True)
    md = f"{args.steps} steps per run, `log_every_n_steps=50`\n\n{table(results)}\n"
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"steps": args.steps, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
