"""One health report per fit: the verdict first, then each finding with its step, layer, numbers, fix and figure.

The report collects every finding of a recorder's judges. When training starts it prints the check at
initialisation as one short block (``init check: 2 problems`` and a line each); at the end of fit it writes
``health.md`` into the run's folder (``trainer.log_dir``), the same text to every logger that shows text
(TensorBoard's Text tab, a W&B table, an MLflow artifact ``health.md``), and prints the verdict with the file's
path. A healthy fit says so in one line.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from callbacks.judges.base import Finding

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from callbacks._writers import Writer

#: where to look, for each figure or chart a finding names
PLACES = {
    "loss": "the loss chart (TensorBoard: Custom Scalars)",
    "activation/distribution": "the figure `activation/distribution` (Images) and the activation charts",
    "activation_grad/distribution": "the figure `activation_grad/distribution` (Images) and the gradient std chart",
    "param_grad/distribution": "the figure `param_grad/distribution` (Images) and the grad:data chart",
    "update_ratio/history": "the figure `update_ratio/history` (Images) and the update:data chart (Custom Scalars)",
}
COLUMNS = ["step", "where", "finding", "fix", "look at", "kind"]


def _say(text: str) -> None:
    """Prints above the progress bar (tqdm clears and redraws it), on stderr like Lightning's own messages."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


class Report:
    """Collects findings; prints the init check, writes ``health.md`` and the loggers' report at the end of fit.

    Args:
        console: print the init check when training starts and the verdict at the end.
        filename: the report's file name in the run's folder (None: no file).
    """

    def __init__(self, console: bool = True, filename: str | None = "health.md") -> None:
        self.console = console
        self.filename = filename
        self.reset()

    def reset(self) -> None:
        self.init_said = False
        self.text = ""
        self.path: Path | None = None
        self.verdict = ""

    def _repr_markdown_(self) -> str:
        """The report as a notebook shows it (Jupyter, Colab, VS Code): its markdown, the headings two levels down
        so that it sits under the notebook's own."""
        if not self.text:
            return "*No health report yet: it is written at the end of `trainer.fit`.*"
        return "\n".join(f"##{line}" if line.startswith("#") else line for line in self.text.splitlines())

    def observe(self, step: int, findings: Sequence[Finding]) -> None:
        """The new findings of a recorded step; step 0's are the check at initialisation, printed as one block."""
        if step != 0 or self.init_said:
            return
        self.init_said = True
        problems = [f for f in findings if f.severity == "problem"]
        if self.console:
            head = f"init check: {_count(len(problems), 'problem')}" if problems else "init check: no problem found"
            _say("\n".join([head, *(f"  - {f.text}" for f in problems)]))

    @rank_zero_only
    def finish(
        self, trainer: pl.Trainer, writers: Sequence[Writer], findings: Sequence[Finding], log_dir: str | None
    ) -> None:
        """Writes the report of the fit's ``findings`` (``health.md`` in ``log_dir``, the loggers) and prints its
        verdict. ``log_dir``: ``trainer.log_dir``, read by the caller on every rank (a collective under DDP)."""
        findings = sorted(findings, key=lambda f: f.step)  # (stable: in the order found within a step)
        problems = [f for f in findings if f.severity == "problem"]
        notes = [f for f in findings if f.severity != "problem"]
        steps = trainer.global_step
        if problems:
            self.verdict = f"{_count(len(problems), 'problem')} found in {steps:,} steps"
        else:
            self.verdict = f"healthy, no problem found in {steps:,} steps"
        self.text = render(self.verdict, problems, notes)
        rows = [[str(f.step), f.where, f.message, f.fix, f.figure, f.severity] for f in findings]
        for writer in writers:
            writer.report(self.text, COLUMNS, rows, steps)
        if self.filename and log_dir:
            self.path = Path(log_dir) / self.filename
            _write_atomically(self.path, self.text)
        if self.console:
            where = f" ({_relative(self.path)})" if self.path is not None else ""
            _say(f"health: {self.verdict}{where}")


def render(verdict: str, problems: Sequence[Finding], notes: Sequence[Finding]) -> str:
    """The report as markdown: the verdict, each problem (step, where, numbers, fix, where to look), the notes."""
    lines = [f"# Training health: {verdict}", ""]
    for i, f in enumerate(problems, 1):
        where = f" · `{f.where}`" if f.where else ""
        lines += [f"## {i}. Step {f.step:,}{where}", "", f.message, ""]
        if f.fix:
            lines += [f"**Fix**: {f.fix}", ""]
        if f.figure:
            lines += [f"**Look at**: {PLACES.get(f.figure, f'`{f.figure}`')}", ""]
    if notes:
        lines += ["## Notes", ""]
        lines += [f"- Step {f.step:,}: {f.text}" for f in notes]
        lines.append("")
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _relative(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path`` and renames it: never a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
