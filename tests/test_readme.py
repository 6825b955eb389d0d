"""The README's examples, run as a reader types them after the quick start (issue 12, item 2; issue 19).

This module is also the machinery for the documentation's examples (`tests/test_docs.py` runs those of
`docs/*.md` with the same functions). A page is read when the tests are collected, so examples that others add
are picked up. Every fenced block must say its language: ```bash and ```python blocks are run, ```text and
```yaml blocks are output or files shown, never run; any other label, or none, fails `test_fences_are_labelled`
(so that no example is left unchecked silently). A block that is not a runnable example (an API sketch) is
marked by the comment `<!-- not-run: the reason -->` on the line before it; each of its commands or the block
is reported as skipped with that reason.

```python blocks: each block as written, saved as `example.py` in a fresh scratch directory and run there in a
fresh `python` process, with the venv of this interpreter and `$MAKEMORE_NAMES` pointing at a small corpus the
test writes. The only substitutions are `PY_SUBSTITUTIONS` (fewer steps). A block that loads
`lightning_logs/version_N/...` gets a short `train.py fit` run before it in its directory. It must exit 0 with
no traceback.

```bash blocks: every line is one command (a trailing backslash joins lines; `#` lines are comments) and the
first rule of `RULES` that matches it decides what happens:

- run: the line as written, with `bash -c`, in one scratch directory per page shared by the page's commands in
  page order (so `predict --ckpt_path lightning_logs/version_0/...` finds the first `fit`'s checkpoint), with the
  venv of this interpreter active (`PATH` and `VIRTUAL_ENV`, as `source .venv/bin/activate` sets them) and
  `$MAKEMORE_NAMES` pointing at a small corpus the test writes. The only substitution: `train.py fit` gets
  `--trainer.max_steps 3` appended after the reader's own flags (so it wins) and before any `>` redirect.
  A command whose comment says it `fails` or shows an `error` must exit non-zero with one line starting
  `error:`; every other command must exit 0.
- dry-run: `make` targets run as `make -n ...` in the project: the target exists and its recipe resolves (each
  recipe is one of the commands run here, or the install).
- tensorboard: started as written, the page it serves is fetched once, then it is stopped.
- skip, with the reason shown by `pytest -ra`: the test suite itself, benchmarks (minutes), GPUs and cluster
  launchers, installs, and the shell set-up the test already does.
A command no rule knows fails the test: add a rule here rather than leave a command unchecked.
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

# what a block's fence may say: the first two are run, the others are shown only
RUN_LANGUAGES = ("bash", "python")
SHOWN_LANGUAGES = ("text", "yaml")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(\S.*?)\s*-->$")

# (pattern, replacement, why): the only changes made to a ```python block before it runs
PY_SUBSTITUTIONS: list[tuple[str, str, str]] = [
    (r"\bmax_steps=[0-9_]+", "max_steps=5", "a few steps instead of a full run"),
]


@dataclass(frozen=True)
class Block:
    line: int  # line of the opening fence
    lang: str  # what the fence says ("" if nothing)
    code: str  # the lines between the fences
    not_run: str = ""  # the reason of a `<!-- not-run: reason -->` on the line before the fence


@dataclass(frozen=True)
class Command:
    line: int  # page line where the command starts
    text: str  # as written, continuation lines joined, without the trailing comment
    comment: str  # the trailing `# ...` comment, if any
    not_run: str = ""  # the block's `not-run` reason, if any


def code_blocks(text: str) -> list[Block]:
    """Every fenced block of a markdown page, with its language, first line and `not-run` reason."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped.startswith("```"):
            i += 1
            continue
        start, lang, body = i + 1, stripped[3:].strip(), []
        previous = lines[i - 1].strip() if i else ""
        marker = NOT_RUN.match(previous)
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        indent = len(lines[start - 1]) - len(lines[start - 1].lstrip())
        code = "\n".join(line[indent:] for line in body) + "\n"
        blocks.append(Block(start, lang, code, marker.group(1) if marker else ""))
        i += 1
    return blocks


def stray_markers(text: str) -> list[int]:
    """Lines of `not-run` markers that mark nothing: not right before a fence, or without a reason."""
    lines = [*text.splitlines(), ""]
    return [
        n + 1
        for n, line in enumerate(lines[:-1])
        if line.strip().startswith("<!--")
        and "not-run" in line
        and (not NOT_RUN.match(line.strip()) or not lines[n + 1].strip().startswith("```"))
    ]


def readme_commands(text: str) -> list[Command]:
    """Every command of every ```bash block of `text`, with its line number on the page."""
    commands: list[Command] = []
    for block in code_blocks(text):
        if block.lang != "bash":
            continue
        pending, start = "", 0
        for offset, raw in enumerate(block.code.splitlines(), start=1):
            stripped = raw.strip()
            if not pending and (not stripped or stripped.startswith("#")):
                continue
            if not pending:
                start = block.line + offset
            if stripped.endswith("\\"):
                pending += stripped[:-1].rstrip() + " "
                continue
            code, comment = _split_comment(pending + stripped)
            commands.append(Command(start, code, comment, block.not_run))
            pending = ""
    return commands


def python_blocks(text: str) -> list[Block]:
    return [block for block in code_blocks(text) if block.lang == "python"]


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
    (
        r"^(\S*/)?python (benchmarks|docs)/",
        "skip",
        "a benchmark or a figure script (minutes): its results are in the repo",
    ),
    (r"^(pip|\S*/pip|\S*python -m pip) install", "skip", "installs packages"),
    (r"^(git|cd) ", "skip", "changes the checkout"),
    (r"^(\S*/)?tensorboard ", "tensorboard", ""),
    (r"^(\S*/)?python train\.py ", "run", ""),
]


def classify(command: Command) -> tuple[str, str]:
    """The action (`run`, `dry-run`, `tensorboard`, `skip`, `unknown`) and the reason for a skip."""
    if command.not_run:
        return "skip", f"marked not-run: {command.not_run}"
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


def as_python(code: str) -> str:
    """The Python the test runs: the block with `PY_SUBSTITUTIONS` applied."""
    for pattern, replacement, _ in PY_SUBSTITUTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def expects_failure(command: Command) -> bool:
    return re.search(r"\b(fails|error)\b", command.comment) is not None


def command_id(command: Command) -> str:
    return f"L{command.line}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", _program(command.text))[:48]


def block_id(block: Block) -> str:
    return f"L{block.line}"


def reader_workdir(work: Path) -> Path:
    """The reader's working directory: train.py and configs/ of this checkout, nothing else yet."""
    for name in ("train.py", "configs"):
        (work / name).symlink_to(ROOT / name)
    return work


def reader_environment(corpus_dir: Path) -> dict[str, str]:
    """The environment after the quick start: the venv active, $MAKEMORE_NAMES at a small written corpus."""
    corpus = corpus_dir / "names.txt"
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


def check_command(command: Command, page: str, workdir: Path, env: dict[str, str]) -> None:
    """Run (or dry-run, or skip) one ```bash command of `page` as its rule says, and check its outcome."""
    where = f"{page} line {command.line}"
    action, reason = classify(command)
    if action == "unknown":
        pytest.fail(f"{where}: `{command.text}` matches no rule in tests/test_readme.py")
    if action == "skip":
        pytest.skip(f"{where}: {reason}")
    if action == "dry-run":
        proc = _bash(f"make -n {shlex.join(shlex.split(command.text)[1:])}", ROOT, env)
        assert proc.returncode == 0, f"{where}: `{command.text}`\n{proc.stderr[-2000:]}"
        return
    if action == "tensorboard":
        _serve_tensorboard(command.text, workdir, env)
        return
    line = as_run(command)
    _ensure_versions(line, workdir, env)
    proc = _bash(line, workdir, env)
    where = f"{where}: `{line}` exited {proc.returncode}"
    if expects_failure(command):
        errors = [s for s in proc.stderr.splitlines() if s.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1, f"{where}, expected one error line\n{proc.stderr[-2000:]}"
    else:
        assert proc.returncode == 0, f"{where}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{where}\n{proc.stderr[-3000:]}"


def check_python_block(block: Block, page: str, scratch: Path, env: dict[str, str]) -> None:
    """Run one ```python block of `page` as written (but `PY_SUBSTITUTIONS`) in a fresh process in `scratch`."""
    where = f"{page} line {block.line}"
    if block.not_run:
        pytest.skip(f"{where}: marked not-run: {block.not_run}")
    workdir = reader_workdir(scratch)
    code = as_python(block.code)
    _ensure_versions(code, workdir, env)
    (workdir / "example.py").write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "example.py"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"{where} exited {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{where}\n{proc.stderr[-3000:]}"


def check_fences(text: str, page: str) -> None:
    """Every fence names a known language, and every `not-run` marker marks a block and gives a reason."""
    known = RUN_LANGUAGES + SHOWN_LANGUAGES
    bad = [f"line {b.line}: ```{b.lang}" for b in code_blocks(text) if b.lang not in known]
    assert not bad, f"{page}: label every block as one of {', '.join(known)} (the first two run in CI): {bad}"
    stray = stray_markers(text)
    assert not stray, f"{page}: write `<!-- not-run: the reason -->` on the line right before a fence: lines {stray}"


README_TEXT = README.read_text(encoding="utf-8")
COMMANDS = readme_commands(README_TEXT)
PYTHON_BLOCKS = python_blocks(README_TEXT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return reader_workdir(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def reader_env(tmp_path_factory) -> dict[str, str]:
    return reader_environment(tmp_path_factory.mktemp("readme_corpus"))


def test_readme_has_the_quick_start():
    programs = [_program(c.text) for c in COMMANDS]
    assert "make train" in programs and "make test" in programs


def test_readme_fences_are_labelled():
    check_fences(README_TEXT, "README.md")


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


def test_blocks_and_not_run_markers():
    text = (
        "intro\n<!-- not-run: a sketch -->\n```python\nf(x)\n```\n\n```python\n"
        "trainer = L.Trainer(max_steps=200_000)\n```\n```text\nout\n```\n<!-- not-run: nothing -->\ntext\n"
        "<!-- not-run: shell sketch -->\n```bash\nmake train\n```\n<!-- not-run: -->\n```python\nx\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b.line, b.lang, b.not_run) for b in blocks] == [
        (3, "python", "a sketch"),
        (7, "python", ""),
        (10, "text", ""),
        (16, "bash", "shell sketch"),
        (20, "python", ""),
    ]
    assert as_python(blocks[1].code) == "trainer = L.Trainer(max_steps=5)\n"
    assert stray_markers(text) == [13, 19]  # marks nothing; gives no reason (so its block runs)
    (command,) = readme_commands(text)
    assert classify(command) == ("skip", "marked not-run: shell sketch")
    with pytest.raises(AssertionError, match=r"lines \[13, 19\]"):
        check_fences(text, "page")
    with pytest.raises(AssertionError, match="```console"):
        check_fences("```console\n$ ls\n```\n", "page")
    with pytest.raises(AssertionError, match="line 1: ```'"):
        check_fences("```\nplain\n```\n", "page")


@pytest.mark.parametrize("command", COMMANDS, ids=command_id)
def test_readme_command(command: Command, workdir: Path, reader_env: dict[str, str]):
    check_command(command, "README.md", workdir, reader_env)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_id)
def test_readme_python_block(block: Block, tmp_path: Path, reader_env: dict[str, str]):
    check_python_block(block, "README.md", tmp_path, reader_env)
