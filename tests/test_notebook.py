"""docs/notebook.ipynb: committed without outputs, and it runs top to bottom on a real Jupyter kernel (issue 27).

The executed notebook must show the monitors' figures inline (image/png outputs) and each health report as
formatted text (text/markdown display data), and the training bar as one display output per fit.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sysconfig
import venv

import pytest
import tomllib

from tests.conftest import ROOT

NOTEBOOK = ROOT / "docs" / "notebook.ipynb"
#: the notebook's repository, as its install cell and the Colab links name it
REPO = re.compile(r'REPO_URL = "https://github\.com/([^/"]+/[^/"]+)"')
COLAB = re.compile(r"https://colab\.research\.google\.com/github/([^/]+/[^/]+)/blob/main/docs/notebook\.ipynb")


def code_cells() -> list[str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def test_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code, "the notebook has no code cell"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, "".join(cell["source"])[:80]


def test_full_length_table_is_the_benchmarks(tmp_path):
    """The full-length numbers the notebook quotes are those of benchmarks/results/lecture_table.md."""
    table = (ROOT / "benchmarks/results/lecture_table.md").read_text(encoding="utf-8").split("\n\n")[0].strip()
    text = "\n".join("".join(c["source"]) for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"])
    for line in table.splitlines():
        assert line in text, line


def test_notebook_runs_with_figures_and_reports_inline(tmp_path, names_path, monkeypatch):
    if importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None:
        pytest.skip("needs nbclient and ipykernel: pip install -e '.[test]' (make setup does)")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MAKEMORE_NAMES", str(names_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o for o in outputs if o.output_type == "display_data"]
    assert sum("image/png" in o.data for o in shown) >= 10
    reports = [o for o in shown if "text/markdown" in o.data]
    assert len(reports) == 8 and all("Training health" in o.data["text/markdown"] for o in reports)
    bars = [o for o in shown if "text/html" in o.data and "<progress" in o.data["text/html"]]
    assert len(bars) == 8 and all("3000/3000" in o.data["text/plain"] for o in bars)


def test_colab_links_and_install_cell_name_one_repository():
    """The "Open in Colab" links (README, the docs' home, the notebook's top) open this notebook of the repository
    that the first cell installs from, the one ``pyproject.toml`` declares."""
    text = NOTEBOOK.read_text(encoding="utf-8")
    (repo,) = set(REPO.findall(code_cells()[0]))
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
    assert declared == f"https://github.com/{repo}"  # the repository pyproject.toml declares, no placeholder
    assert COLAB.findall(text) == [repo]  # the badge at the top of the notebook (and of its docs page)
    for page in ("README.md", "docs/index.md"):
        assert COLAB.findall((ROOT / page).read_text(encoding="utf-8")) == [repo], page


def test_first_cell_installs_the_package_where_it_is_missing(tmp_path):
    """The first cell, run by a Python that has the dependencies but not this package (Colab's case), installs
    it from the git repository REPO_URL names, here a clone of this checkout's files, offline; after it the
    package imports from that Python's own site-packages."""
    if shutil.which("git") is None:
        pytest.skip("needs git (pip installs from a git URL)")
    # the repository: the files a `pip install git+URL` builds from, committed
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, repo / name)
    for package in ("lightning_makemore", "callbacks"):
        shutil.copytree(ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "the package"]):
        subprocess.run([*git, *args], cwd=repo, check=True)

    # a Python with everything this one has (torch, Lightning, pip, setuptools) but this package
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    if not python.exists():
        pytest.skip("a POSIX virtual environment layout is needed")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    for entry in os.listdir(ours):
        if entry.endswith(".pth") or "editable" in entry or entry.startswith("lightning_makemore"):
            continue  # this package, installed in development mode, is what the cell must install
        if not os.path.exists(os.path.join(site, entry)):
            os.symlink(os.path.join(ours, entry), os.path.join(site, entry))
    missing = subprocess.run([python, "-c", "import lightning_makemore"], capture_output=True, cwd=tmp_path)
    assert missing.returncode != 0  # before: not importable

    cell = code_cells()[0]
    assert REPO.search(cell)
    cell = REPO.sub(f'REPO_URL = "file://{repo}"', cell)
    offline = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | offline
    ran = subprocess.run([python, "-c", cell], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip() == f"installed lightning-makemore from file://{repo}"

    # what the notebook imports, the subpackages included
    code = "import callbacks.judges, callbacks.notebook, callbacks.probes, lightning_makemore.progress as p\n"
    code += "print(callbacks.probes.__file__, p.__file__)"
    imported = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr[-2000:]
    where = imported.stdout.split()
    assert len(where) == 2 and all(path.startswith(site) for path in where), (where, site)

    again = subprocess.run([python, "-c", cell], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    assert again.stdout == ""  # importable now: the cell installs nothing
