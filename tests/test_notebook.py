"""docs/notebook.ipynb: committed without outputs, and it runs top to bottom on a real Jupyter kernel (issue 27).

The executed notebook must show the monitors' figures inline (image/png outputs) and each health report as
formatted text (text/markdown display data), and the training bar as one display output per fit.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import ROOT

NOTEBOOK = ROOT / "docs" / "notebook.ipynb"


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
