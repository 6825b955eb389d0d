"""Command-line mistakes said in one line: jsonargparse's errors translated (the closest flag, the allowed values),
and the checkpoint pre-check of `fit --ckpt_path` (a checkpoint with nothing left to train).

`lightning_makemore.cli` raises these and `main` prints them as one line on stderr (`NothingToTrain` on stdout,
exit status 0: nothing is wrong).
"""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any

import lightning as L
import torch

from lightning_makemore.data import NamesDataModule
from lightning_makemore.model import net_settings
from lightning_makemore.module import MakemoreModule


class UsageError(ValueError):
    """A command-line mistake; the message is one line naming the flag, the allowed values and the fix."""


class NothingToTrain(Exception):
    """`fit --ckpt_path` from a checkpoint that already reached `max_steps`: nothing is wrong, and nothing to do.
    The message is one line with the numbers and what to run instead."""


def check_something_to_train(ckpt_path: str, max_steps: int | None) -> None:
    """Raises `NothingToTrain` when the checkpoint's step is already `max_steps` or more (Lightning would open a
    new run folder and stop at once, with a train loss and no validation)."""
    if not max_steps or max_steps <= 0:
        return
    try:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step")
    except Exception:  # not a checkpoint: Lightning says why when it loads it
        return
    if not isinstance(step, int) or step < max_steps:
        return
    where = "already at" if step == max_steps else "past"
    raise NothingToTrain(
        f"Nothing to train: {ckpt_path} is at step {step:,}, {where} --trainer.max_steps {max_steps:,}. "
        f"Pass a larger --trainer.max_steps to train on, `python train.py test --ckpt_path {ckpt_path}` to "
        f"evaluate it, or `python train.py predict --ckpt_path {ckpt_path}` to sample names."
    )


def _known_flags() -> list[str]:
    """Every flag of the CLI (the Trainer's included), for "did you mean"."""

    def params(fn: Any) -> list[str]:
        skip = {"self", "vocab", "block_size", "net", "args", "kwargs"}
        return [name for name in inspect.signature(fn).parameters if name not in skip]

    flags = [f"--model.{n}" for n in [*params(MakemoreModule.__init__), *net_settings()]]
    flags += [f"--data.{n}" for n in params(NamesDataModule.__init__)]
    flags += [f"--trainer.{n}" for n in params(L.Trainer.__init__)]
    flags += ["--monitors", "--spikes", "--fix", "--threads", "--fast_path"]
    return [*flags, "--config", "--seed_everything", "--ckpt_path"]


#: Lightning's generic flags that this model replaces with its own
_NOT_OURS = {
    "--optimizer": "--model.optimizer adamw (or sgd) with --model.lr",
    "--lr_scheduler": "--model.schedule step|constant|cosine|onecycle",
}


def explain_argument_error(message: str) -> str:
    """jsonargparse's error (often many lines) as one line with what is allowed and the closest flag."""
    unknown = re.search(r"unrecognized arguments: (\S+)", message, re.IGNORECASE)
    if unknown:
        flag = unknown.group(1).split("=")[0]
        if flag in _NOT_OURS:
            return f"{flag} is Lightning's generic flag, which this model does not use: pass {_NOT_OURS[flag]}."
        close = difflib.get_close_matches(flag, _known_flags(), n=1, cutoff=0.6)
        hint = f": did you mean `{close[0]}`?" if close else "."
        return f"unknown flag {flag}{hint}"
    key = re.search(r'Parser key "([^"]+)"', message)
    got = re.search(r"Got value: (.*)", message)
    literal = re.search(r"Literal\[(.*?)\]", message)
    if key and literal:
        allowed = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
        value = got.group(1).strip() if got else "?"
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"--{key.group(1)} {value} is not allowed{hint}: expected one of {', '.join(allowed)}."
    if key:
        expected = re.search(r"Expected a (.*?)\. Got", message)
        kind = re.sub(r"<class '(\w+)'>", r"\1", expected.group(1)) if expected else "another value"
        value = got.group(1).strip() if got else "?"
        return f"--{key.group(1)} {value} is not allowed: expected {kind}."
    return " ".join(message.split())
