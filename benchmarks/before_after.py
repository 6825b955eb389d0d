"""One benchmark on two checkouts in the same session: the code before a change and after it, alternately.

The benchmark script is this checkout's (so both trees are measured the same way); what differs is the code it
imports: each run is a separate process with ``PYTHONPATH`` set to one tree, so that its ``callbacks`` and
``lightning_makemore`` are imported from there (the benchmarks print where from, and this script checks it).
Runs alternate before, after, after, before, ... so that a drift in the machine's load hits both alike. The
benchmark writes its measurements with ``--json``; this script prints them side by side as ratios:

- ``bench_speed.py``: each loop's CPU time over loop (c)'s in the same repeat (paired), median over every repeat
  of every run, and its inverse, the ratio of steps/s that ``bench_speed.py`` reports (d / c, ...);
- ``bench_monitors.py``: each row's CPU time over ``none``'s in the same repeat; with ``--profile ROW``, the CPU
  seconds spent inside ``callbacks/`` in the window; with ``--memory``, each case's peak memory.

The older tree is a worktree outside the repository (never committed)::

    git worktree add /tmp/before 5bca1d6
    python benchmarks/before_after.py --before /tmp/before -- benchmarks/bench_speed.py --steps 3000 \\
        --repeats 3 --loops ours ours+monitors ours+group --output /tmp/speed.md
    python benchmarks/before_after.py --before /tmp/before -- benchmarks/bench_monitors.py --memory --repeats 1
    git worktree remove /tmp/before

``--after-args="..."`` adds arguments for the newer tree only (e.g. loops or rows the older code does not have).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, script: str, args: list[str], out: Path) -> dict[str, Any]:
    """One run of ``script`` importing the code of ``tree``; its ``--json`` record."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    print(f"\n=== {tree}: {script} {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, script, *args, "--json", str(out)], env=env, check=True, cwd=ROOT)
    record = json.loads(out.read_text())
    if not str(record["code"]).startswith(str(tree)):
        raise RuntimeError(f"Expected the code of {tree} to be measured, but {record['code']} was imported.")
    return record


def paired(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Each row's time over the reference's, repeat by repeat."""
    return {r: [t / ref for t, ref in zip(ts, times[reference], strict=True)] for r, ts in times.items()}


def ratios(records: list[dict[str, Any]]) -> tuple[str, dict[str, list[float]]]:
    """The paired time ratios of every repeat of ``records`` (one tree), by row; and the reference row."""
    out: dict[str, list[float]] = {}
    for rec in records:
        if "times" in rec:  # bench_speed
            reference, times = "ours", {loop: x["cpu"] for loop, x in rec["times"].items()}
        else:  # bench_monitors
            reference, times = "none", {r: [x[rec["clock"]] for x in xs] for r, xs in rec["results"].items()}
        for row, xs in paired(times, reference).items():
            out.setdefault(row, []).extend(xs)
    return reference, out


def report(records: dict[str, list[dict[str, Any]]], trees: dict[str, Path]) -> None:
    first = records["before"][0]
    loads = [x for recs in records.values() for rec in recs for x in rec.get("load", [])]
    print(f"\nbefore: {trees['before']}; after: {trees['after']}; runs alternating, {len(records['before'])} each")
    if loads:
        print(f"load average (1 min) over the runs: {min(loads):.1f}-{max(loads):.1f}")
    if "inside" in first:  # bench_monitors --profile
        print("\n| code | CPU s inside callbacks/ per window (each run) | median | window CPU s (median) |")
        print("|---|---|---:|---:|")
        for name, recs in records.items():
            inside = [r["inside"] for r in recs]
            window = statistics.median(r["cpu"] for r in recs)
            each = ", ".join(f"{x:.3f}" for x in inside)
            print(f"| {name} | {each} | {statistics.median(inside):.3f} | {window:.2f} |")
        before, after = (statistics.median(r["inside"] for r in records[k]) for k in ("before", "after"))
        print(f"after / before: {after / before:.2f}")
        return
    if "runs" in first:  # bench_monitors --memory
        cases = [c for c in records["after"][0]["runs"] if c in first["runs"]]
        extra = [c for c in records["after"][0]["runs"] if c not in first["runs"]]
        mib = 2**20
        print(f"largest watched tensor: {first['runs'][cases[0]][0]['largest_watched'] / mib:.1f} MiB")
        print(
            "\n| case | before: peak RSS of the step (MiB) | after | after - before | before: over unrecorded | after |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        peak = {
            k: {c: statistics.median(x["peak"] for rec in recs for x in rec["runs"][c]) for c in recs[0]["runs"]}
            for k, recs in records.items()
        }
        peak["before"].update(dict.fromkeys(extra, float("nan")))
        for c in cases + extra:
            b, a = peak["before"][c], peak["after"][c]
            bu, au = (b - peak["before"]["unrecorded"]) / mib, (a - peak["after"]["unrecorded"]) / mib
            print(f"| {c} | {b / mib:,.0f} | {a / mib:,.0f} | {(a - b) / mib:+,.0f} | {bu:+,.0f} | {au:+,.0f} |")
        return
    reference, before = ratios(records["before"])
    _, after = ratios(records["after"])
    speed = "times" in first
    print(
        f"\nCPU time over `{reference}`'s in the same repeat (median of {len(before[reference])} repeats"
        f" before, {len(after[reference])} after)" + ("; steps/s ratio = 1 / time ratio" if speed else "")
    )
    print(
        "\n| row | before: time ratio | after: time ratio | after / before | before: each repeat | after: each repeat |"
    )
    print("|---|---:|---:|---:|---|---|")
    for row in [*before, *(r for r in after if r not in before)]:
        if row == reference:
            continue
        b = statistics.median(before[row]) if row in before else float("nan")
        a = statistics.median(after[row]) if row in after else float("nan")
        each = [", ".join(f"{x:.3f}" for x in d.get(row, [])) for d in (before, after)]
        print(f"| {row} | {b:.3f} | {a:.3f} | {a / b:.3f} | {each[0]} | {each[1]} |")
    for name, recs in records.items():
        refs = [t for rec in recs for t in (rec["times"][reference]["cpu"] if speed else [])]
        if refs:
            print(f"{name}: (c) CPU s per window, each repeat: " + ", ".join(f"{t:.2f}" for t in refs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the older checkout (a git worktree)")
    parser.add_argument("--after", type=Path, default=ROOT, help="the newer checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternating")
    parser.add_argument("--after-args", default="", help="extra arguments for the newer tree only")
    parser.add_argument("--save", type=Path, help="also write every run's record here (JSON)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: the benchmark to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("Expected a benchmark after `--`, e.g. `-- benchmarks/bench_speed.py --steps 3000`.")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "callbacks" / "__init__.py").is_file():
            parser.error(f"Expected a checkout with callbacks/ at --{name}, but got {tree}.")
    records: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    order = [("before", "after"), ("after", "before")]
    with tempfile.TemporaryDirectory(prefix="before_after_") as tmp:
        for r in range(args.rounds):
            for name in order[r % 2]:
                extra = shlex.split(args.after_args) if name == "after" else []
                out = Path(tmp) / f"{name}{r}.json"
                records[name].append(run(trees[name], command[0], [*command[1:], *extra], out))
    if args.save:
        args.save.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, **records}, indent=1))
    report(records, trees)


if __name__ == "__main__":
    main()
