"""The docstring examples of lightning_makemore run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_makemore

MODULES = sorted(m.name for m in pkgutil.iter_modules(lightning_makemore.__path__, "lightning_makemore."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # an example that writes, writes here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"


def test_the_examples_are_there():
    """Each module with public classes shows at least one runnable example (not only prose)."""
    counts = {
        name: sum(len(t.examples) for t in doctest.DocTestFinder().find(importlib.import_module(name)))
        for name in MODULES
    }
    assert all(counts[f"lightning_makemore.{m}"] > 0 for m in ("data", "model", "module", "fastpath")), counts
