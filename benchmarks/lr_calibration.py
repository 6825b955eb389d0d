"""The learning-rate advice, calibrated on outcomes: does following it lower the validation loss?

For SGD sweeps of two of the lecture's nets (Kaiming tanh without BatchNorm, and the default BatchNorm net), at
3,000 steps: each run's typical update:data ratio (the median parameter's, from the ``lr/model`` finding), the
loss's evidence (``callbacks.judges.lr.loss_evidence``), what the advice says (problem or note, and by how much),
and the val loss after following the ratio alone (the former rule: the full factor to 1e-3) and the calibrated rule
(only when the loss agrees, a decade at most). Writes ``benchmarks/results/lr_calibration.md``.

    python benchmarks/lr_calibration.py            # ~20 fits, a few minutes on two shared cores
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from callbacks.judges.lr import TARGET
from lightning_makemore.heal import NOISE, _fit

NETS = {
    "Kaiming tanh, no BatchNorm": ["--model.batchnorm", "false"],
    "BatchNorm net (default)": [],
}
LRS = [0.001, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]


def _lr_finding(findings):
    return next((f for f in findings if f.key == "lr/model"), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--root", default="/tmp/lr_calibration")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    for net, flags in NETS.items():
        for lr in LRS:
            base = [*flags, "--model.lr", str(lr), "--trainer.max_steps", str(args.steps), *COMMON]
            base += ["--trainer.default_root_dir", args.root]
            r = _fit(base)
            f = _lr_finding(r.findings)
            row = {
                "net": net,
                "lr": lr,
                "val": r.val,
                "ratio": "",
                "evidence": "",
                "advice": "none",
                "old": "",
                "new": "",
            }
            if f is not None:
                # the ratio's finding says "updates are 10^x ... the training loss: y"; one from the loss alone names
                # the ratio (when there is one) and its evidence is its action's
                ratio = re.search(r"10\^(-?\d+\.\d)", f.message)
                evidence = re.search(r"the training loss: (\w+)", f.message)
                row["ratio"] = ratio.group(1) if ratio else ""
                row["evidence"] = evidence.group(1) if evidence else (f.action.evidence if f.action else "")
                row["advice"] = f"{f.severity}" + (f", lr × {f.action.value:.3g}" if f.action else "")
                if ratio is not None:
                    old = 10 ** (TARGET - float(ratio.group(1)))  # the former rule: straight to 1e-3
                    row["old"] = f"{_fit([*base, '--model.lr', f'{lr * old:.4g}']).val:.4f} (lr {lr * old:.3g})"
                if f.action is not None:
                    new = lr * float(f.action.value)
                    row["new"] = f"{_fit([*base, '--model.lr', f'{new:.4g}']).val:.4f} (lr {new:.3g})"
            rows.append(row)
            print(row, flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "# Learning-rate advice against outcomes",
        "",
        f"`python benchmarks/lr_calibration.py` ({args.steps:,} steps per fit, SGD, the lecture's step schedule;"
        f" {minutes:.1f} min on a shared 2-core machine). Seed noise of the val loss: {NOISE:.3f} (std over seeds,"
        " benchmarks/results/fault_zoo.md); a difference below 2x that is no difference.",
        "",
        "The former rule moved the lr all the way to an update:data of 1e-3 whenever the median ratio was more than"
        " a decade away; the calibrated rule (callbacks/judges/lr.py) calls a too-high lr a problem only when the"
        " training loss rose, oscillated, blew up or diverged, a too-low one only while the loss still falls, and"
        " moves a decade at most down (100x up); where the ratio is within its band, the loss alone can still call"
        " it (blown up, oscillating: / 10; still falling as fast as at the start, or a fresh classifier stuck: x 10).",
        "",
        "| net | lr | val | median log10 update:data | loss evidence | calibrated advice | val after the ratio's"
        " full factor | val after the calibrated action |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['net']} | {r['lr']:g} | {r['val']:.4f} | {r['ratio']} | {r['evidence']} | {r['advice']} |"
            f" {r['old']} | {r['new']} |"
        )
    out = Path(__file__).parent / "results" / "lr_calibration.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} in {minutes:.1f} min")


if __name__ == "__main__":
    main()
