"""Data: vocabulary, context windows, the lecture's split, loaders, download, and every bad input."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from lightning_makemore.data import (
    DataError,
    EvalBatches,
    NamesDataModule,
    TrainBatches,
    Vocabulary,
    build_windows,
    download_names,
    read_names,
    split_names,
)

LECTURE_SPLIT = (182_625, 22_655, 22_866)


def test_names_txt_vocabulary_and_split(names_dm):
    assert len(names_dm.vocab) == 27
    assert names_dm.vocab.itos[0] == "." and "".join(names_dm.vocab.itos[1:]) == "abcdefghijklmnopqrstuvwxyz"
    sizes = tuple(len(names_dm.splits[s][0]) for s in ("train", "val", "test"))
    assert sizes == LECTURE_SPLIT
    X, Y = names_dm.splits["train"]
    assert X.shape == (182_625, 3) and X.dtype == torch.long and Y.shape == (182_625,)


def test_split_is_the_lectures_random_shuffle(names_path):
    words = names_path.read_text().splitlines()
    random.seed(42)  # the lecture's exact calls, on the global RNG
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    train, val, test = split_names(read_names(names_path), seed=42)
    assert (train, val, test) == (words[:n1], words[n1:n2], words[n2:])
    assert len(words) == 32_033


def test_split_equals_the_lectures_global_rng_calls(small_corpus):
    words = small_corpus.read_text().splitlines()
    state = random.getstate()
    random.seed(42)  # the lecture's exact calls, on the global RNG
    random.shuffle(words)
    random.setstate(state)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    assert split_names(read_names(small_corpus), seed=42) == (words[:n1], words[n1:n2], words[n2:])
    assert (n1, n2 - n1, len(words) - n2) == (320, 40, 40)


def test_tests_find_the_corpus_where_the_package_does(tmp_path, monkeypatch, small_corpus):
    """conftest's `names_path` reads $MAKEMORE_NAMES, else the user's cache; offline without either it skips."""
    import lightning_makemore.data as data
    from tests.conftest import find_names_corpus

    find = find_names_corpus.__wrapped__  # uncached
    monkeypatch.setenv("MAKEMORE_NAMES", str(small_corpus))
    assert find() == (small_corpus, "")
    monkeypatch.delenv("MAKEMORE_NAMES")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cached = tmp_path / "xdg" / "lightning_makemore" / "names.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(small_corpus.read_bytes())
    assert find() == (cached, "")  # e.g. what an earlier `make train` downloaded
    cached.unlink()
    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")  # nothing listens: offline
    path, reason = find()
    assert path is None and reason.startswith("needs the real names corpus: none at ") and "\n" not in reason
    assert not any(cached.parent.iterdir())  # nothing half-written in the cache


def test_hand_computed_windows():
    vocab = Vocabulary.from_names(["ab", "ba"])
    assert vocab.itos == (".", "a", "b")
    X, Y = build_windows(["ab", "ba"], vocab, block_size=3)
    # "ab.": ... -> a, ..a -> b, .ab -> .   then "ba.": ... -> b, ..b -> a, .ba -> .
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [0, 0, 0], [0, 0, 2], [0, 2, 1]]
    assert Y.tolist() == [1, 2, 0, 2, 1, 0]


def test_tiny_corpus_window_count(tiny_corpus):
    names = read_names(tiny_corpus)
    X, _ = build_windows(names, Vocabulary.from_names(names), block_size=4)
    assert len(X) == sum(len(n) + 1 for n in names) == 65  # 5+7+4+9+7+4+7+7+7+8
    assert X.shape == (65, 4)


def test_whitespace_blank_lines_uppercase_and_non_ascii(tmp_path):
    path = tmp_path / "n.txt"
    path.write_text("  Zoë \n\n\tanna\n   \nJosé\n", encoding="utf-8")
    names = read_names(path)
    assert names == ["Zoë", "anna", "José"]
    vocab = Vocabulary.from_names(names)
    assert vocab.itos == (".", "J", "Z", "a", "n", "o", "s", "é", "ë")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"Names file not found: .*missing\.txt"),
        ("DIR", r"Expected a names file, but got a directory"),
        (b"", r"no names found"),
        (b"\n  \n\t\n", r"no names found"),
        (b"anna\nbob\n\xff\xfeoops\n", r"bad\.txt:3: not valid UTF-8"),
        (b"anna\nbo.b\n", r"bad\.txt:2: name 'bo\.b' contains '\.'"),
    ],
    ids=["missing", "directory", "empty", "blank", "non-utf8", "dot-token"],
)
def test_bad_names_files(tmp_path, content, match):
    path = tmp_path / ("missing.txt" if content is None else "bad.txt")
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_names(path)
    dm = NamesDataModule(path=str(path))
    with pytest.raises(DataError, match=match):
        dm.setup("fit")


def test_setup_is_idempotent_and_predict_needs_no_file(small_corpus):
    dm = NamesDataModule(path=str(small_corpus))
    dm.setup("fit")
    first = dm.splits["val"][0]
    dm.setup("validate")
    assert dm.splits["val"][0] is first
    NamesDataModule(path="/nonexistent/names.txt").setup("predict")  # must not raise


def test_env_var_points_at_data(monkeypatch, tiny_corpus):
    monkeypatch.setenv("MAKEMORE_NAMES", str(tiny_corpus))
    dm = NamesDataModule()
    dm.prepare_data()  # no download when a file is given
    dm.setup("fit")
    assert len(dm.vocab) == len(set("".join(read_names(tiny_corpus)))) + 1


def test_download_verifies_sha256_and_is_atomic(tmp_path, tiny_corpus):
    good = hashlib.sha256(tiny_corpus.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "names.txt"
    assert download_names(dest, url=tiny_corpus.as_uri(), sha256=good) == dest
    assert dest.read_bytes() == tiny_corpus.read_bytes()
    other = tmp_path / "cache2" / "names.txt"
    with pytest.raises(DataError, match="sha256"):
        download_names(other, url=tiny_corpus.as_uri(), sha256="0" * 64)
    assert not other.exists() and list(other.parent.iterdir()) == []  # nothing half-written left behind


def test_offline_download_says_how_to_provide_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MAKEMORE_NAMES", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    import lightning_makemore.data as data

    monkeypatch.setattr(data, "NAMES_URL", "http://127.0.0.1:9/names.txt")
    with pytest.raises(DataError, match=r"Could not download .* --data\.path FILE or set \$MAKEMORE_NAMES"):
        NamesDataModule().prepare_data()
    assert not any((tmp_path / "lightning_makemore").glob("*"))


def _toy(n=100, block=3):
    X = torch.arange(n).repeat_interleave(block).view(n, block)
    return X, torch.arange(n)


def test_random_batches_are_gathers_with_replacement_and_resume_exactly():
    X, Y = _toy(1000)
    batches = TrainBatches(X, Y, batch_size=32, seed=1, sampling="random", chunk=7)
    assert len(batches) == 1000 // 32
    seen = list(batches)
    assert all(x.shape == (32, 3) and torch.equal(x[:, 0], y) for x, y in seen)
    again = TrainBatches(X, Y, batch_size=32, seed=1, sampling="random", chunk=7)
    it = iter(again)
    for _ in range(10):
        next(it)
    resumed = TrainBatches(X, Y, batch_size=32, seed=1, sampling="random", chunk=7)
    resumed.load_state_dict(again.state_dict())
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen[10:], resumed, strict=True))
    other_rank = TrainBatches(X, Y, batch_size=32, seed=1, sampling="random", rank=1)
    assert not torch.equal(next(iter(other_rank))[1], seen[0][1])


@pytest.mark.parametrize("n", [33, 64, 65, 97])
def test_shuffled_epochs_never_yield_a_batch_of_one(n):
    X, Y = _toy(n)
    batches = TrainBatches(X, Y, batch_size=32, seed=0, sampling="shuffle")
    for _ in range(3):
        sizes = [len(y) for _, y in batches]
        assert sizes and set(sizes) == {32}
        seen = torch.cat([y for _, y in batches])
        assert len(seen.unique()) == len(seen)  # without replacement within an epoch


def test_shuffled_ranks_are_disjoint():
    X, Y = _toy(1000)
    parts = [torch.cat([y for _, y in TrainBatches(X, Y, 16, 0, "shuffle", rank, 2)]) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 1000 // 32 * 16
    assert not set(parts[0].tolist()) & set(parts[1].tolist())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_each_example_once(world):
    X, Y = _toy(101)
    ys = torch.cat([y for rank in range(world) for _, y in EvalBatches(X, Y, 8, rank, world)])
    assert ys.tolist() == list(range(101))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "Expected block_size >= 1, but got 0"),
        ({"batch_size": 0}, "Expected batch_size >= 1, but got 0"),
        ({"sampling": "bogus"}, "Expected sampling 'random' or 'shuffle'"),
        ({"eval_batch_size": 0}, "Expected eval_batch_size >= 1"),
        ({"num_samples": 0}, "Expected num_samples >= 1"),
    ],
)
def test_bad_datamodule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NamesDataModule(**kwargs)
