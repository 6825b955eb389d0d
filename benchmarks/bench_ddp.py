"""Examples per second of `train.py fit` on 1 and 2 processes (Lightning DDP), measured back to back.

    python benchmarks/bench_ddp.py                       # CPU: 1 vs 2 processes (gloo), batch 32 per device
    python benchmarks/bench_ddp.py --accelerator gpu --batch-sizes 32 4096 --precision bf16-mixed

Each run goes through `train.py` as a user runs it (monitors on unless --no-monitors); a `StepTimer` callback
times the steps after a warm-up, so start-up, process spawn and the final validation are not counted.
The batch size is per device, so 2 processes train on twice the examples per step.
On this 2-core machine 2 processes share the same cores: expect no speed-up, only a check that DDP works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Writes {steps, seconds, world_size} for the steps after `warmup` to $BENCH_TIMER_OUT (rank zero)."""

    def __init__(self, warmup: int = 200) -> None:
        self.warmup, self.start = warmup, None

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.start is not None:
            result = {
                "steps": trainer.global_step - self.warmup,
                "seconds": time.perf_counter() - self.start,
                "world_size": trainer.world_size,
                "device": str(pl_module.device),
            }
            Path(os.environ["BENCH_TIMER_OUT"]).write_text(json.dumps(result))


def run(devices: int, batch: int, steps: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timer.json"
        cmd = [
            sys.executable, str(ROOT / "train.py"), "fit",
            "--trainer.accelerator", args.accelerator, "--trainer.devices", str(devices),
            "--trainer.strategy", "ddp" if devices > 1 else "auto",
            "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.precision", args.precision,
            "--trainer.default_root_dir", tmp, "--data.batch_size", str(batch),
            "--trainer.callbacks+=benchmarks.bench_ddp.StepTimer",
            "--monitors", "false" if args.no_monitors else "true",
        ]  # fmt: skip
        env = os.environ | {"BENCH_TIMER_OUT": str(out), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"run with {devices} device(s) failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    result["examples_per_s"] = result["steps"] * batch * devices / result["seconds"]
    result["steps_per_s"] = result["steps"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--no-monitors", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ddp.md")
    args = parser.parse_args()

    rows = []
    for batch in args.batch_sizes:
        for devices in args.devices:
            r = run(devices, batch, args.steps, args)
            rows.append((batch, devices, r))
            print(f"batch {batch}/device, {devices} process(es): {r['examples_per_s']:,.0f} examples/s "
                  f"({r['steps_per_s']:,.0f} steps/s) on {r['device']}", flush=True)  # fmt: skip
    lines = [
        f"`python benchmarks/bench_ddp.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"{os.cpu_count()} CPU cores, accelerator {args.accelerator}, precision {args.precision}, "
        f"monitors {'off' if args.no_monitors else 'on'}, {args.steps} steps (200 warm-up excluded).",
        "",
        "| batch per device | processes | steps/s | examples/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    base = {b: r["examples_per_s"] for b, d, r in rows if d == min(args.devices)}
    for batch, devices, r in rows:
        lines.append(
            f"| {batch} | {devices} | {r['steps_per_s']:,.0f} | {r['examples_per_s']:,.0f} | "
            f"{r['examples_per_s'] / base[batch]:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
