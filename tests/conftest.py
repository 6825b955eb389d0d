"""Shared fixtures: the real names corpus (found where the package finds it, else skipped) and small corpora
the tests write themselves, so that almost every test runs on a fresh clone, offline, with no ../shared."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# how long `names_path` waits for the corpus download before skipping (offline machines fail fast anyway)
DOWNLOAD_TIMEOUT_S = 10.0

_ONSETS = ["", "b", "br", "c", "ch", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "sh", "t"]
_ONSETS += ["th", "v", "w", "x", "y", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ie", "ou"]
_CODAS = ["", "", "", "n", "l", "r", "s", "x", "th", "nd", "k", "m", "h"]


def synthetic_names(n: int = 400, seed: int = 0) -> list[str]:
    """`n` distinct plausible lowercase names made of 1-3 syllables, the same for the same seed.

    Every letter a-z occurs, so the vocabulary is the real corpus's 27 tokens (`.` + a-z).

    Example::

        >>> names = synthetic_names(300)
        >>> len(names), len(set(names)), sorted(set("".join(names))) == list("abcdefghijklmnopqrstuvwxyz")
        (300, 300, True)
    """
    rng = random.Random(seed)  # own generator: the fixture never depends on (or moves) the global RNG
    names: dict[str, None] = {}
    while len(names) < n:
        syllables = rng.choice((1, 2, 2, 2, 3, 3))
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if 3 <= len(name) <= 12:
            names.setdefault(name)
    out = list(names)
    missing = sorted(set("abcdefghijklmnopqrstuvwxyz") - set("".join(out)))
    for i, ch in enumerate(missing):  # (not reached with the default seed) guarantee the 27-token vocabulary
        out[i] = out[i] + ch
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A names file of 400 deterministic synthetic names (~2,700 training windows), written by the test run.

    Use it instead of the real corpus for anything that needs a corpus but not the lecture's numbers.
    """
    path = tmp_path_factory.mktemp("corpus") / "small_names.txt"
    path.write_text("\n".join(synthetic_names(400)) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """Ten real names (65 windows with block_size 4), written by the test."""
    path = tmp_path / "tiny.txt"
    path.write_text("emma\nolivia\nava\nisabella\nsophia\nmia\namelia\nharper\nevelyn\nabigail\n")
    return path


@functools.cache
def find_names_corpus() -> tuple[Path | None, str]:
    """The real corpus where the package itself finds it: `$MAKEMORE_NAMES`, else the user's cache
    (`$XDG_CACHE_HOME` or `~/.cache/lightning_makemore`), else downloaded there (sha256-checked, once a run).

    Returns:
        The path and "" when found, else None and a one-line reason to skip.

    Raises:
        pytest.fail: `$MAKEMORE_NAMES` is set but names no file (a mistake to fix, not a reason to skip).
    """
    from lightning_makemore.data import ENV_VAR, DataError, NamesDataModule, download_names

    path = NamesDataModule().resolve_path()  # the package's rule without --data.path: env var, else cache
    if path.is_file():
        return path, ""
    if os.environ.get(ENV_VAR):
        pytest.fail(f"${ENV_VAR}={path} is not a file: point it at names.txt or unset it", pytrace=False)
    try:
        return download_names(path, timeout=DOWNLOAD_TIMEOUT_S), ""
    except DataError:
        return None, f"needs the real names corpus: none at {path}, download failed; set ${ENV_VAR}=FILE to run it"


@pytest.fixture(scope="session")
def names_path() -> Path:
    """The real 32,033-name corpus; skips the test with one line when it cannot be found or downloaded."""
    path, reason = find_names_corpus()
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def names_dm(names_path):
    from lightning_makemore import NamesDataModule

    dm = NamesDataModule(path=str(names_path))
    dm.setup("fit")
    return dm
