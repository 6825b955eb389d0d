"""Shared fixtures: the names corpus from ../shared (CI has no internet) and a small hand-made corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def names_file() -> Path:
    """The corpus the tests read: $MAKEMORE_NAMES, else ../shared/data/names.txt beside the project."""
    env = os.environ.get("MAKEMORE_NAMES")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "names.txt"


@pytest.fixture(scope="session")
def names_path() -> Path:
    path = names_file()
    if not path.is_file():
        pytest.fail(f"names corpus not found at {path}: set MAKEMORE_NAMES or put ../shared beside the project")
    return path


@pytest.fixture(scope="session")
def names_dm(names_path):
    from lightning_makemore import NamesDataModule

    dm = NamesDataModule(path=str(names_path))
    dm.setup("fit")
    return dm


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text("emma\nolivia\nava\nisabella\nsophia\nmia\namelia\nharper\nevelyn\nabigail\n")
    return path
