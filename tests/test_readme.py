"""The README's shell commands, run as a reader types them after the quick start (issue 12, item 2).

The README is read when the tests are collected, so commands that others add are picked up. Every line of every
```bash block is one command (a trailing backslash joins lines; `#` lines are comments) and the first rule of
`RULES` that matches it decides what happens:

- run: the line as written, with `bash -c`, in one scratch directory shared by all commands in README order
  (so `predict --ckpt_path lightning_logs/version_0/...` finds the first `fit`'s checkpoint), with the venv of
  this interpreter active (`PATH` and `VIRTUAL_ENV`, as `source .venv/bin/activate` sets them) and
  `$MAKEMORE_NAMES` pointing at a small corpus the test writes. The only substitution: `train.py fit` gets
  `--trainer.max_steps 3` appended after the reader's own flags (so it wins) and before any `>` redirect.
  A command whose comment says it `fails` or shows an `error` must exit non-zero with one line starting
  `error:`; every other command must exit 0.
- dry-run: `make` targets run as `make -n ...` in the project: the target exists and its recipe resolves (each
  recipe is one of the commands run here, or the install).
- tensorboard: started as written, the page it serves is fetched once, then it is stopped.
- skip, with the reason shown by `pytest -ra`: the test suite itself, benchmarks (minutes), GPUs and cluster
  launchers, installs, and the shell set-up the test already does.
A command no rule knows fails the test: add a rule here rather than leave a README command unchecked.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, synthetic_names

README = ROOT / "README.md"
FIT_STEPS = "--trainer.max_steps 3"
TIMEOUT_S = 300


@dataclass(frozen=True)
class Command:
    line: int  # README line where the command starts
    text: str  # as written, continuation lines joined, without the trailing comment
    comment: str  # the trailing `# ...` comment, if any


def readme_commands(text: str) -> list[Command]:
    """Every command of every ```bash block of `text`, with its README line number."""
    commands: list[Command] = []
    in_block, pending, start = False, "", 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block = stripped == "```bash" and not in_block
            continue
        if not in_block or (not pending and (not stripped or stripped.startswith("#"))):
            continue
        if not pending:
            start = lineno
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        code, comment = _split_comment(pending + stripped)
        commands.append(Command(start, code, comment))
        pending = ""
    return commands


def _split_comment(line: str) -> tuple[str, str]:
    """Split `cmd  # comment` at the first `#` outside quotes that starts a word."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def _program(text: str) -> str:
    """The command without leading `VAR=value` assignments."""
    words = text.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words.pop(0)
    return " ".join(words)


# (pattern on the command without leading VAR=value, action, reason); the first match wins
RULES: list[tuple[str, str, str]] = [
    (r"^source \S*activate\b", "skip", "the test runs every command with this interpreter's venv active"),
    (r"^export ", "skip", "the test sets $MAKEMORE_NAMES to its own corpus"),
    (r"^make test", "skip", "a test suite (CI runs it)"),
    (r"^(\S*/)?python -m pytest", "skip", "the test suite itself (CI runs it)"),
    (r"^make \S+", "dry-run", ""),
    (r"^(torchrun|srun|sbatch|mpirun) ", "skip", "needs a cluster launcher"),
    (r"--trainer\.accelerator (gpu|cuda|mps)", "skip", "needs GPUs"),
    (r"^(\S*/)?python benchmarks/", "skip", "a benchmark (minutes): benchmarks/ has its own results"),
    (r"^(pip|\S*/pip|\S*python -m pip) install", "skip", "installs packages"),
    (r"^(git|cd) ", "skip", "changes the checkout"),
    (r"^(\S*/)?tensorboard ", "tensorboard", ""),
    (r"^(\S*/)?python train\.py ", "run", ""),
]


def classify(command: Command) -> tuple[str, str]:
    """The action (`run`, `dry-run`, `tensorboard`, `skip`, `unknown`) and the reason for a skip."""
    program = _program(command.text)
    for pattern, action, reason in RULES:
        if re.search(pattern, program):
            return action, reason
    return "unknown", ""


def as_run(command: Command) -> str:
    """The shell line the test runs: as written, plus `FIT_STEPS` for `train.py fit` (before a redirect)."""
    text = command.text
    if not re.search(r"\btrain\.py fit\b", text) or "--help" in text.split():
        return text
    head, redirect, tail = text.partition(" > ")
    return f"{head} {FIT_STEPS}{redirect}{tail}"


def expects_failure(command: Command) -> bool:
    return re.search(r"\b(fails|error)\b", command.comment) is not None


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def _id(command: Command) -> str:
    return f"L{command.line}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", _program(command.text))[:48]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The reader's working directory: train.py and configs/ of this checkout, nothing else yet."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "configs"):
        (work / name).symlink_to(ROOT / name)
    return work


@pytest.fixture(scope="module")
def reader_env(tmp_path_factory) -> dict[str, str]:
    """The environment after the quick start: the venv active, $MAKEMORE_NAMES at a small written corpus."""
    corpus = tmp_path_factory.mktemp("readme_corpus") / "names.txt"
    corpus.write_text("\n".join(synthetic_names(400)) + "\n", encoding="utf-8")
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ)
    env.update(
        MAKEMORE_NAMES=str(corpus),
        VIRTUAL_ENV=str(venv_bin.parent),
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("PYTHONHOME", None)
    return env


def _bash(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _ensure_versions(text: str, cwd: Path, env: dict[str, str]) -> None:
    """Run a short default `fit` until each `lightning_logs/version_N` the command names exists (when a
    command is run alone, e.g. with -k, without the fits before it)."""
    for n in sorted({int(v) for v in re.findall(r"lightning_logs/version_(\d+)", text)}):
        while not (cwd / "lightning_logs" / f"version_{n}").exists():
            proc = _bash(f"python train.py fit {FIT_STEPS}", cwd, env)
            assert proc.returncode == 0, proc.stderr[-2000:]


def _serve_tensorboard(line: str, cwd: Path, env: dict[str, str]) -> None:
    """Start TensorBoard as written, fetch its page once, stop it (its default port search avoids clashes)."""
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {line}"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline, output = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            out = proc.stdout.readline()
            output += out
            match = re.search(r"(http://\S+?:\d+/)", out)
            if match:
                with urllib.request.urlopen(match.group(1), timeout=10) as response:
                    assert response.status == 200
                return
            if not out and proc.poll() is not None:
                break
        pytest.fail(f"`{line}` did not serve a page:\n{output[-2000:]}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_readme_has_the_commands_this_test_relies_on():
    programs = [_program(c.text) for c in COMMANDS]
    assert "make train" in programs and "make test" in programs  # the quick start
    assert any(p.startswith("python train.py fit --help") for p in programs)
    assert any(p.startswith("python train.py predict ") for p in programs)
    assert any(p.startswith("tensorboard ") or p.startswith("make tensorboard") for p in programs)


def test_comment_and_continuation_parsing():
    text = "x\n```bash\nmake train   # trains\n# a comment\npython train.py fit \\\n    --a 1  # two lines\n```\n"
    assert readme_commands(text) == [
        Command(3, "make train", "trains"),
        Command(5, "python train.py fit --a 1", "two lines"),
    ]
    assert as_run(Command(1, "python train.py fit --print_config > my.yaml", "")) == (
        f"python train.py fit --print_config {FIT_STEPS} > my.yaml"
    )
    assert classify(Command(1, "FOO=1 python train.py fit", "")) == ("run", "")


@pytest.mark.parametrize("command", COMMANDS, ids=_id)
def test_readme_command(command: Command, workdir: Path, reader_env: dict[str, str]):
    action, reason = classify(command)
    if action == "unknown":
        pytest.fail(f"README line {command.line}: `{command.text}` matches no rule in tests/test_readme.py")
    if action == "skip":
        pytest.skip(f"README line {command.line}: {reason}")
    if action == "dry-run":
        proc = _bash(f"make -n {shlex.join(shlex.split(command.text)[1:])}", ROOT, reader_env)
        assert proc.returncode == 0, f"README line {command.line}: `{command.text}`\n{proc.stderr[-2000:]}"
        return
    if action == "tensorboard":
        _serve_tensorboard(command.text, workdir, reader_env)
        return
    line = as_run(command)
    _ensure_versions(line, workdir, reader_env)
    proc = _bash(line, workdir, reader_env)
    where = f"README line {command.line}: `{line}` exited {proc.returncode}"
    if expects_failure(command):
        errors = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, f"{where}, expected one error line\n{proc.stderr[-2000:]}"
    else:
        assert proc.returncode == 0, f"{where}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{where}\n{proc.stderr[-3000:]}"
