"""Advice that heals: a health report's actions as `train.py` flags, the rerun command, and the repair loop.

- :func:`flags_for` turns the actions of a fit's problem findings (``callbacks.judges.base.Action``) into the
  `train.py` flags that apply them: the learning rate (``--model.lr``), the output layer's scale
  (``--model.last_layer_scale``), the init regime (``--model.init kaiming``), normalisation
  (``--model.batchnorm true``), the activation (``--model.activation``), gradient clipping
  (``--trainer.gradient_clip_val``); what has no flag of its own (the learning rate of named parameters, the
  scale of a hidden layer) goes through ``--fix KIND:TARGETS:VALUE`` (``callbacks.fixes.ApplyFixes``).
- :func:`rerun_command` is the line that ends a `train.py fit` run's ``health.md``: the run's own config plus those
  flags.
- :func:`heal` is ``python train.py heal [fit flags]``: train; while the verdict names problems with fixes, retrain
  with them (same seed, same budget), a few rounds at most, each round all of them together and each alone; the
  round's best is kept only when the validation loss improves by more than the seed noise (:data:`NOISE`,
  measured); the table of rounds is printed and written to
  ``heal.md`` in the first run's folder after every round (so Ctrl-C leaves every finished round in it).

Left out on purpose: searching hyperparameters (only the report's own fixes are tried) and fixes that need new
data (noisy labels, unnormalised inputs).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callbacks.fixes import actions_of
from callbacks.judges.base import Action, Finding

#: the seed noise of the validation loss: its std over seeds (seed_everything and init_seed 1-5: std 0.011) of the
#: default net (the lecture's BatchNorm MLP) at 3,000 steps, as docs/heal.md lists them. A change is kept when
#: it lowers the val loss by more than 2 of them (a difference of two runs has a std of sqrt(2) of one).
NOISE = 0.012
#: rounds of the loop after the first fit
ROUNDS = 3


def parse_fix(text: str) -> Action:
    """``"scale_lr:net.head.weight,net.head.bias:0.1"`` -> an Action (targets may be empty: ``"scale_lr::0.1"``).

    Raises:
        ValueError: not ``KIND:TARGETS:VALUE`` with a generic kind and a number.
    """
    from callbacks.fixes import GENERIC

    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in GENERIC:
        raise ValueError(
            f"Expected --fix KIND:TARGETS:VALUE with KIND one of {', '.join(GENERIC)}, but got {text!r}"
            " (e.g. --fix scale_lr:net.head.weight:0.1)."
        )
    kind, targets, value = parts
    try:
        number: float | str = float(value)
    except ValueError:
        if kind != "init":
            raise ValueError(f"Expected a number after the last ':' of --fix {text!r}, but got {value!r}.") from None
        number = value
    return Action(kind, tuple(t for t in targets.split(",") if t), number)  # type: ignore[arg-type]


def format_fix(action: Action) -> str:
    """The ``--fix`` value of ``action`` (the inverse of :func:`parse_fix`)."""
    value = f"{action.value:.4g}" if isinstance(action.value, float) else str(action.value)
    return f"{action.kind}:{','.join(action.targets)}:{value}"


def flags_for(
    actions: list[Action],
    model: dict[str, Any],
    trainer: dict[str, Any],
    fix: str | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """``(flags, skipped)``: the `train.py` flags that apply ``actions`` to a run with these ``model``, ``trainer``
    and ``data`` settings (its config's sections) and ``--fix`` value, and a phrase for each action that would
    change nothing."""
    flags: list[str] = []
    skipped: list[str] = []
    fixes: list[str] = []
    lr = float(model.get("lr", 0.1))
    for a in actions:
        if a.kind == "scale_lr" and not a.targets:
            lr *= float(a.value)  # type: ignore[arg-type]
        elif a.kind == "scale_layer" and a.targets == ("net.head",):
            if model.get("last_layer_scale") is not None:
                skipped.append(f"{a.describe()} (the output layer is already scaled)")
            else:
                flags += ["--model.last_layer_scale", "0.01"]
        elif a.kind == "init":
            if model.get("init") == a.value:
                skipped.append(f"{a.describe()} (already {a.value})")
            else:
                flags += ["--model.init", str(a.value)]
        elif a.kind == "normalise":
            if model.get("batchnorm"):
                skipped.append(f"{a.describe()} (already on)")
            else:
                flags += ["--model.batchnorm", "true"]
        elif a.kind == "activation":
            flags += ["--model.activation", str(a.value)]
        elif a.kind == "clip_gradients":
            if trainer.get("gradient_clip_val") is not None:
                skipped.append(f"{a.describe()} (already clipped)")
            else:
                flags += ["--trainer.gradient_clip_val", f"{float(a.value):g}"]  # type: ignore[arg-type]
        elif a.kind == "batch_size":
            if int((data or {}).get("batch_size") or 0) >= int(a.value):  # type: ignore[arg-type]
                skipped.append(f"{a.describe()} (already {data['batch_size']})")  # type: ignore[index]
            else:
                flags += ["--data.batch_size", str(int(a.value))]  # type: ignore[arg-type]
        elif a.kind in ("clean_labels", "label_source", "normalise_inputs"):
            skipped.append(f"{a.describe()} (an edit of the data, not a flag)")
        elif a.kind == "unfreeze":
            skipped.append(f"{a.describe()} (train.py's model freezes nothing)")
        elif a.kind == "loss_logits":  # train.py's model gives the loss its logits: nothing to change here
            skipped.append(f"{a.describe()} (an edit of the model's code, not a flag)")
        else:  # named parameters' lr, a hidden layer's scale: the generic callback
            fixes.append(format_fix(a))
    if lr != float(model.get("lr", 0.1)):
        flags += ["--model.lr", f"{lr:.4g}"]
    if fixes:
        flags += ["--fix", _merge_fixes([*(fix or "").split(), *fixes])]
    return _dedupe(flags), skipped


def _merge_fixes(fixes: list[str]) -> str:
    """One ``--fix`` value: the same scaling of the same targets given twice becomes one (the factors multiplied;
    dropped when they cancel)."""
    merged: dict[tuple[str, tuple[str, ...]], Action] = {}
    for text in fixes:
        a = parse_fix(text)
        key = (a.kind, a.targets)
        if key in merged and a.kind in ("scale_lr", "scale_layer"):
            a = Action(a.kind, a.targets, float(merged[key].value) * float(a.value))  # type: ignore[arg-type]
        merged[key] = a
    kept = [a for a in merged.values() if not (a.kind.startswith("scale") and abs(float(a.value) - 1) < 0.05)]  # type: ignore[arg-type]
    return " ".join(format_fix(a) for a in kept)


def merge_flags(flags: list[str], more: list[str]) -> list[str]:
    """``flags`` with ``more`` added; a flag given in both takes ``more``'s value (in ``flags``' place)."""
    new = dict(zip(more[::2], more[1::2], strict=True))
    out: list[str] = []
    i = 0
    while i < len(flags):
        flag = flags[i]
        if flag in new and i + 1 < len(flags):
            out += [flag, new.pop(flag)]
            i += 2
        else:
            out.append(flag)
            i += 1
    for flag, value in new.items():
        out += [flag, value]
    return out


def _dedupe(flags: list[str]) -> list[str]:
    """Flags given twice (``--model.init kaiming`` from two findings): the first of each."""
    out: list[str] = []
    seen: set[str] = set()
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        key = flag
        if key not in seen:
            seen.add(key)
            out += [flag, value]
    return out


def rerun_command(config_path: str, flags: list[str]) -> str:
    """The shell command that reruns a fit from its saved ``config.yaml`` with ``flags`` added."""
    return shlex.join(["python", "train.py", "fit", "--config", config_path, *flags])


def rerun_section(findings: list[Finding], config: Any, config_path: str) -> str:
    """The end of a run's ``health.md``: the command that reruns it with the report's fixes ("" when none)."""
    flags, skipped = _flags(actions_of(findings), config)
    if not flags:
        return ""
    lines = ["## Rerun with the fixes", "", "```bash", rerun_command(config_path, flags), "```", ""]
    if skipped:
        lines += [f"Not applied (would change nothing): {'; '.join(skipped)}.", ""]
    return "\n".join(lines)


def _flags(actions: list[Action], config: Any) -> tuple[list[str], list[str]]:
    """:func:`flags_for` on a `fit` config (a jsonargparse namespace or a dict)."""
    data = config.get("data")
    return flags_for(
        actions, dict(config["model"]), dict(config["trainer"]), config.get("fix"), dict(data) if data else None
    )


def append_rerun(cli: Any, log_dir: str | None) -> None:
    """Appends :func:`rerun_section` to the run's ``health.md`` (called by the CLI after `fit`)."""
    from callbacks import HealthMonitor

    monitor = next((cb for cb in cli.trainer.callbacks if isinstance(cb, HealthMonitor)), None)
    if monitor is None or monitor.report is None or monitor.report.path is None or not log_dir:
        return
    config = cli.config[cli.subcommand] if cli.subcommand else cli.config
    section = rerun_section(monitor.findings, config, _rel(Path(log_dir) / "config.yaml"))
    if section and monitor.report.path.is_file():
        with open(monitor.report.path, "a", encoding="utf-8") as f:
            f.write("\n" + section)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------
# the repair loop


@dataclass
class Round:
    """One fit of the loop: what it changed, its verdict and val loss, and whether the change was kept."""

    number: int
    changed: str
    flags: list[str]
    verdict: str = ""
    val: float = float("nan")
    seconds: float = 0.0
    folder: str = ""
    outcome: str = ""  # "start", "kept", "better, not the best", "worse", "no better"
    findings: list[Finding] = field(default_factory=list)


def _fit(args: list[str]) -> Round:
    """One `train.py fit` in this process; its verdict, val loss (the whole split, eval mode), folder, findings."""
    from callbacks import HealthMonitor
    from lightning_makemore.cli import main
    from lightning_makemore.module import split_loss

    started = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args and sys.argv has others
    # Ctrl-C inside a fit: Lightning shuts it down, then exits with status 1 and leaves SIGINT ignored; the loop
    # wants it as a KeyboardInterrupt, and the next Ctrl-C to work
    pressed = []
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum: int, frame: object) -> None:
        pressed.append(signum)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        cli = main(["fit", *args])
    except SystemExit:
        if pressed:
            raise KeyboardInterrupt from None
        raise
    finally:
        sys.argv = argv
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    seconds = time.perf_counter() - started
    if cli is None or cli.trainer.interrupted:
        raise KeyboardInterrupt
    monitor = next((cb for cb in cli.trainer.callbacks if isinstance(cb, HealthMonitor)), None)
    findings = monitor.findings if monitor is not None else []
    verdict = monitor.report.verdict if monitor is not None and monitor.report is not None else ""
    val = split_loss(cli.model.net, *cli.datamodule.splits["val"])
    folder = _rel(Path(cli.trainer.log_dir)) if cli.trainer.log_dir else ""
    r = Round(0, "", args, verdict, val, seconds, folder, findings=findings)
    r.config = cli.config["fit"]  # type: ignore[attr-defined]
    return r


def render(rounds: list[Round], noise: float, note: str = "") -> str:
    """heal.md: the table of rounds, then the kept run's folder and command."""
    lines = [
        "# Heal: the report's fixes, each kept only if the val loss improves",
        "",
        f"A change is kept when it lowers the val loss by more than {2 * noise:.3f} (2 x the seed noise {noise:.3f}).",
        "",
        "| round | what changed | verdict | val | outcome | folder |",
        "|---|---|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(f"| {r.number} | {r.changed} | {r.verdict} | {r.val:.4f} | {r.outcome} | {r.folder} |")
    kept = [r for r in rounds if r.outcome in ("start", "kept")]
    if kept:
        best = kept[-1]
        lines += [
            "",
            f"Kept run: `{best.folder}`",
            "",
            "```bash",
            shlex.join(["python", "train.py", "fit", *best.flags]),
            "```",
        ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _table(rounds: list[Round]) -> str:
    rows = [("round", "what changed", "verdict", "val", "outcome")]
    rows += [(str(r.number), r.changed, r.verdict, f"{r.val:.4f}", r.outcome) for r in rounds]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def _write(path: Path | None, text: str) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # never a half-written heal.md


def _candidates(r: Round, tried: set[str]) -> list[tuple[str, list[str]]]:
    """What to try after run ``r``: all its applicable fixes together, then each alone; a fit whose whole command
    was run before is left out (a fix tried on the first run is tried again on top of a kept change)."""
    config = r.config  # type: ignore[attr-defined]
    actions = actions_of(r.findings)
    together, _ = _flags(actions, config)
    useful = [a for a in actions if _flags([a], config)[0]]
    out = [(", ".join(a.describe() for a in useful), together)] if together else []
    if len(useful) > 1:
        out += [(a.describe(), _flags([a], config)[0]) for a in useful]
    seen = set(tried)
    unique = []
    for what, flags in out:  # e.g. one activation flag asked for by several layers: one fit
        command = shlex.join(merge_flags(r.flags, flags))
        if command not in seen:
            seen.add(command)
            unique.append((what, flags))
    return unique


def heal(args: list[str], rounds: int = ROUNDS, noise: float = NOISE) -> list[Round]:
    """The repair loop (see the module docstring) on `train.py fit` ``args``; returns the rounds."""
    done: list[Round] = []
    path: Path | None = None
    try:
        first = _fit(args)
    except KeyboardInterrupt:
        print("heal: interrupted during the first fit; nothing to report.", file=sys.stderr)
        sys.exit(130)
    first.changed, first.outcome = "(the run as given)", "start"
    done.append(first)
    path = Path(first.folder) / "heal.md" if first.folder else None
    best, tried = first, {shlex.join(first.flags)}
    note, interrupted, number = "", False, 1
    try:
        for number in range(1, rounds + 1):
            options = _candidates(best, tried)
            if not options:
                problems = [f for f in best.findings if f.severity == "problem"]
                if number == 1:
                    note = (
                        f"The report names {len(problems)} problem(s), none with a fix train.py can apply: nothing to"
                        " retrain."
                        if problems
                        else "The run is healthy: nothing to fix."
                    )
                break
            # all of them together, then each alone: the best of the round is kept if it beats the best so far
            start, winner = best, None
            for what, flags in options:
                merged = merge_flags(start.flags, flags)
                tried.add(shlex.join(merged))
                r = _fit(merged)
                r.number, r.changed, r.flags = number, what, merged
                if r.val < start.val - 2 * noise:
                    r.outcome = "better"
                    if winner is None or r.val < winner.val:
                        winner = r
                else:
                    r.outcome = "worse" if r.val > start.val + 2 * noise else "no better"
                done.append(r)
                _write(path, render(done, noise))
            if winner is None:
                break  # nothing of this round helped: the next would propose the same
            for r in done:
                if r.number == number and r.outcome == "better":
                    r.outcome = "kept" if r is winner else "better, not the best"
            best = winner
            _write(path, render(done, noise))
    except KeyboardInterrupt:
        interrupted = True
        note = f"Interrupted during round {number}: the rounds above finished and are kept as they were."
    _write(path, render(done, noise, note))
    print("\n" + _table(done))
    if note:
        print(note)
    print(f"\nkept run: {best.folder}\n  {shlex.join(['python', 'train.py', 'fit', *best.flags])}")
    if path is not None:
        print(f"heal report: {path}")
    if interrupted:
        sys.exit(130)  # Ctrl-C's exit status, once the finished rounds are reported
    return done


def main(argv: list[str]) -> list[Round]:
    """``train.py heal [--rounds N] [--noise X] [fit flags]``."""
    rounds, noise, rest = ROUNDS, NOISE, []
    it = iter(argv)
    for arg in it:
        if arg in ("--rounds", "--noise"):
            value = next(it, None)
            try:
                if arg == "--rounds":
                    rounds = int(value)  # type: ignore[arg-type]
                else:
                    noise = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                print(f"error: {arg} expects a number, got {value!r} (e.g. {arg} 3).", file=sys.stderr)
                sys.exit(2)
        else:
            rest.append(arg)
    return heal(rest, rounds, noise)
