"""The ``>>>`` examples in the docstrings of ``callbacks/`` run, and show what they print.

Every module of the package is listed (found on disk, so a new module is picked up); a module whose docstrings
have no ``>>>`` example yet is skipped, so its owner can turn its ``Example::`` block into a doctest later.
"""

import doctest
import importlib
import pkgutil

import pytest

import callbacks
from callbacks import _activation_kinds

MODULES = sorted(f"callbacks.{m.name}" for m in pkgutil.iter_modules(callbacks.__path__))


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    """`register_activation`'s example registers a class: keep it out of the other tests."""
    monkeypatch.setattr(_activation_kinds, "_REGISTRY", dict(_activation_kinds._REGISTRY))


def test_modules_are_listed():
    listed = {"callbacks._activation_kinds", "callbacks._layer_order", "callbacks._selection", "callbacks.activation"}
    assert listed <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, capsys):
    module = importlib.import_module(name)
    if not any(t.examples for t in doctest.DocTestFinder().find(module)):
        pytest.skip(f"{name} has no >>> examples")
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 0
    assert failed == 0, capsys.readouterr().out  # doctest's report: the example, its expected and its actual output
