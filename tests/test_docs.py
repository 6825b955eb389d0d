"""The documentation site: it builds with `mkdocs build --strict`, and every example of every page runs (issue 19).

The examples of `docs/**/*.md` run with the README's machinery and rules (`tests/test_readme.py`'s docstring):
```python blocks each in a fresh process in a fresh scratch directory, ```bash commands by `RULES`, in one
scratch directory per page, in page order; `<!-- not-run: reason -->` before a block skips it with that reason.
The build runs once here (into a temporary folder), so `make test` and CI fail on a broken page, link, anchor,
API reference or included file; `make docs` runs the same build into build/site/. The end-of-fit block shown on
the lecture page is compared line by line with what a short `train.py fit` prints (its numbers are a full run's).
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_readme import (
    FIT_STEPS,
    README_TEXT,
    TIMEOUT_S,
    Block,
    Command,
    block_id,
    check_command,
    check_fences,
    check_python_block,
    code_blocks,
    command_id,
    python_blocks,
    reader_environment,
    reader_workdir,
    readme_commands,
)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BUILD_TIMEOUT_S = 300
# how many lines of the README a reader sees before scrolling (a laptop's browser window)
FIRST_SCREEN_LINES = 45


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _texts() -> dict[str, str]:
    return {_name(page): page.read_text(encoding="utf-8") for page in PAGES}


TEXTS = _texts()
COMMANDS = [(name, command) for name, text in TEXTS.items() for command in readme_commands(text)]
BLOCKS = [(name, block) for name, text in TEXTS.items() for block in python_blocks(text)]


def _command_id(item: tuple[str, Command]) -> str:
    return f"{item[0]}:{command_id(item[1])}"


def _block_id(item: tuple[str, Block]) -> str:
    return f"{item[0]}:{block_id(item[1])}"


@pytest.fixture(scope="module")
def reader_env(tmp_path_factory) -> dict[str, str]:
    return reader_environment(tmp_path_factory.mktemp("docs_corpus"))


@pytest.fixture(scope="module")
def page_workdir(tmp_path_factory):
    """One reader's working directory per page, shared by the page's commands in page order."""
    workdirs: dict[str, Path] = {}

    def get(page: str) -> Path:
        if page not in workdirs:
            workdirs[page] = reader_workdir(tmp_path_factory.mktemp(re.sub(r"\W+", "_", page)))
        return workdirs[page]

    return get


def _page_text(site: Path, page: str) -> str:
    """The visible text of a built page (tags and scripts removed)."""
    raw = (site / page / "index.html").read_text(encoding="utf-8")
    raw = re.sub(r"<script.*?</script>", "", raw, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", raw))


def test_docs_build_strict(tmp_path: Path):
    """`mkdocs build --strict` passes, the API pages show the docstrings, the included files are in the pages."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("needs mkdocs-material and mkdocstrings[python]: pip install -e '.[test]' (make setup does)")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner about MkDocs 2.0, not a warning of ours
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    api = _page_text(site, "api")
    # each object's Args are rendered from its docstring (a name from each class's signature)
    for name, arg in [
        ("callbacks.ActivationMonitor", "saturation_threshold"),
        ("callbacks.GradientMonitor", "modules"),
        ("callbacks.ParameterMonitor", "params"),
        ("callbacks.UpdateRatioMonitor", "every_n_steps"),
        ("callbacks.CallbackGroup", "callbacks"),
        ("callbacks.register_activation", "kind"),
        ("callbacks.HealthWarning", "UserWarning"),
        ("plot_distributions", "saturation_threshold"),  # a function of callbacks.figures
        ("lightning_makemore.MakemoreModule", "lr_decay_at"),
        ("lightning_makemore.NamesDataModule", "block_size"),
    ]:
        assert name in api, f"the API reference lacks {name}"
        assert arg in api, f"the API reference lacks {arg} ({name}'s docstring)"
    # pages that show a file of the repository show it: a line of each, read from the file itself
    lecture_table = (ROOT / "benchmarks/results/lecture_table.md").read_text(encoding="utf-8")
    first_row = next(line for line in lecture_table.splitlines() if line.startswith("| original"))
    assert first_row.split("|")[2].strip() in _page_text(site, "lecture")
    assert "net_settings" in _page_text(site, "development")  # the README's Development section, included


def test_every_page_is_in_the_nav():
    """A page outside the nav is a warning, and so an error under --strict; this says which one, fast."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*(\S+\.md)\s*$", config, flags=re.M))
    missing = [page.relative_to(DOCS).as_posix() for page in PAGES if page.relative_to(DOCS).as_posix() not in listed]
    assert not missing, f"add these pages to the nav of mkdocs.yml: {missing}"


@pytest.mark.parametrize("page", list(TEXTS), ids=str)
def test_page_fences_are_labelled(page: str):
    check_fences(TEXTS[page], page)


def test_readme_links_resolve():
    """The README's relative links (the docs pages, the picture) name files of this repository."""
    targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", README_TEXT)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") and t.endswith(".md") for t in relative)
    missing = [t for t in relative if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_first_screen_gets_a_student_to_the_charts():
    """Issue 19: from the clone to "which layer is saturated, is my lr right" on the README's first screen."""
    first = "\n".join(README_TEXT.splitlines()[:FIRST_SCREEN_LINES])
    for needed in ("make train", "make tensorboard", "custom_scalars", "saturated", "learning rate", "docs/charts.md"):
        assert needed in first, f"{needed!r} is not in the README's first {FIRST_SCREEN_LINES} lines"


def printed_pattern(line: str) -> str:
    """A documented output line as a regex: its numbers, the time, the run's version and the venv's path vary."""
    pattern = re.escape(line).replace(r"\.venv/bin/tensorboard", r"\S*tensorboard")
    pattern = re.sub(r"version_\d+", r"version_\\d+", pattern)
    pattern = re.sub(r"\d[\d,]*(\\\.\d+)?", r"[\\d,]+(\\.\\d+)?", pattern)
    return pattern.replace("…", r"[\d.]+")  # the seconds, elided on the page


def test_printed_pattern():
    steps = printed_pattern("  steps       200,000 of 200,000 in … s")
    assert re.fullmatch(steps, "  steps       3 of 3 in 1.4 s")
    assert not re.fullmatch(steps, "  steps       3 in 1.4 s")
    loss = printed_pattern("  loss        train 2.0684, val 2.1109 (whole splits, eval mode)")
    assert re.fullmatch(loss, "  loss        train 3.2531, val 3.2542 (whole splits, eval mode)")
    assert not re.fullmatch(loss, "  loss        train 3.2531 (whole splits, eval mode)")
    tensorboard = printed_pattern("  TensorBoard .venv/bin/tensorboard --logdir lightning_logs")
    assert re.fullmatch(tensorboard, "  TensorBoard /tmp/x/.venv/bin/tensorboard --logdir lightning_logs")
    logs = printed_pattern("  logs        lightning_logs/version_0")
    assert re.fullmatch(logs, "  logs        lightning_logs/version_7")


def test_the_documented_end_of_fit_block_is_what_fit_prints(tmp_path: Path, reader_env: dict[str, str]):
    """The lecture page's end-of-fit block has the lines a fit prints today (numbers aside: they are a full run's)."""
    (block,) = [b for b in code_blocks(TEXTS["docs/lecture.md"]) if b.lang == "text" and b.code.startswith("Done.")]
    summary, names = block.code.split("\n\n")[:2]
    documented = [*summary.splitlines(), names.splitlines()[0]]  # the summary and the names' heading
    workdir = reader_workdir(tmp_path)
    proc = subprocess.run(
        ["python", "train.py", "fit", *FIT_STEPS.split()],
        cwd=workdir,
        env=reader_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout[proc.stdout.index("Done.") :].replace("\n\n", "\n").splitlines()[: len(documented)]
    for doc_line, line in zip(documented, printed, strict=True):
        assert re.fullmatch(printed_pattern(doc_line), line), f"documented {doc_line!r}, printed {line!r}"


@pytest.mark.parametrize("item", COMMANDS, ids=_command_id)
def test_docs_command(item: tuple[str, Command], page_workdir, reader_env: dict[str, str]):
    page, command = item
    check_command(command, page, page_workdir(page), reader_env)


@pytest.mark.parametrize("item", BLOCKS, ids=_block_id)
def test_docs_python_block(item: tuple[str, Block], tmp_path: Path, reader_env: dict[str, str]):
    page, block = item
    check_python_block(block, page, tmp_path, reader_env)
