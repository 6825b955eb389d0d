"""The names corpus: reading, vocabulary, context windows, the lecture's split and fast batch loaders.

What lives here:
- `read_names` reads and validates a names file (one name per line), with errors that name file and line.
- `Vocabulary` maps characters to integers; `.` is token 0, the start/end token.
- `build_windows` turns names into (context, next-character) pairs, like the lecture's `build_dataset`.
- `download_names` fetches the public makemore corpus into the user's cache, atomically, checked by sha256.
- `NamesDataModule` ties it together for Lightning.

Batches are made by indexing the whole (N, block_size) tensor at once: a per-example `__getitem__`
plus `collate` would cost more than this model's forward and backward pass together.
Left out on purpose: tokenisers other than characters, and data sets other than one-item-per-line text.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
ENV_VAR = "MAKEMORE_NAMES"
END_TOKEN = "."  # start and end of every name share index 0, as in the lecture


class DataError(ValueError):
    """A names file (or the way to reach one) is unusable; the message says which file, line and fix."""


# ---------------------------------------------------------------------------------------------------------
# reading and vocabulary


def read_names(path: str | os.PathLike) -> list[str]:
    """Read one name per line, stripping whitespace and skipping blank lines.

    Raises:
        DataError: the file is missing, a directory, not UTF-8, empty, or a name contains the `.` token.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Names file not found: {path}. Pass an existing file with --data.path or ${ENV_VAR}.")
    if path.is_dir():
        raise DataError(f"Expected a names file, but got a directory: {path}. Pass the file inside it.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x}). Save the file as UTF-8 text."
        ) from None
    names = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if END_TOKEN in name:
            raise DataError(
                f"{path}:{lineno}: name {name!r} contains {END_TOKEN!r}, which is reserved as the "
                "start/end token. Remove it from the name."
            )
        names.append(name)
    if not names:
        raise DataError(f"{path}: no names found (the file is empty or blank). Put one name per line.")
    return names


@dataclass(frozen=True)
class Vocabulary:
    """Character vocabulary with `.` at index 0 and every other character sorted from 1.

    Example::

        >>> v = Vocabulary.from_names(["emma", "ava"])
        >>> v.itos, v.encode("ma"), v.decode([3, 1])
        (('.', 'a', 'e', 'm', 'v'), [3, 1], 'ma')
    """

    itos: tuple[str, ...]

    @classmethod
    def from_names(cls, names: Sequence[str]) -> Vocabulary:
        chars = sorted(set("".join(names)))
        return cls((END_TOKEN, *chars))

    def __post_init__(self) -> None:
        object.__setattr__(self, "itos", tuple(self.itos))
        if not self.itos or self.itos[0] != END_TOKEN:
            raise DataError(f"Expected vocabulary to start with {END_TOKEN!r}, but got {list(self.itos)[:3]}")
        object.__setattr__(self, "_stoi", {ch: i for i, ch in enumerate(self.itos)})

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def stoi(self) -> dict[str, int]:
        return self._stoi  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return [self.stoi[ch] for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in ids)


def build_windows(names: Sequence[str], vocab: Vocabulary, block_size: int) -> tuple[Tensor, Tensor]:
    """Every (context, next character) pair of every name, as in the lecture's `build_dataset`.

    The context starts as `block_size` end tokens and each name is followed by the end token, so a name of
    length n gives n + 1 examples.

    Example::

        >>> v = Vocabulary.from_names(["ab"])
        >>> X, Y = build_windows(["ab"], v, block_size=2)
        >>> X.tolist(), Y.tolist()
        ([[0, 0], [0, 1], [1, 2]], [1, 2, 0])
    """
    xs: list[list[int]] = []
    ys: list[int] = []
    for name in names:
        context = [0] * block_size
        for ix in [*vocab.encode(name), 0]:
            xs.append(context)
            ys.append(ix)
            context = [*context[1:], ix]
    X = torch.tensor(xs, dtype=torch.long).view(len(xs), block_size)  # (N, block_size)
    Y = torch.tensor(ys, dtype=torch.long)  # (N,)
    return X, Y


def split_names(names: Sequence[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: `random.seed(42); random.shuffle(words)`, then 80 % / 10 % / 10 %."""
    words = list(names)
    random.Random(seed).shuffle(words)  # same sequence as random.seed(seed); random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return words[:n1], words[n1:n2], words[n2:]


# ---------------------------------------------------------------------------------------------------------
# download


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lightning_makemore"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_names(dest: Path, url: str | None = None, sha256: str = NAMES_SHA256, timeout: float = 30) -> Path:
    """Download the corpus to `dest` atomically (temp file + rename), verified by sha256.

    A file already at `dest` with the right checksum is reused; nothing half-written is ever left at `dest`.

    Raises:
        DataError: offline, or the download's checksum does not match.
    """
    url = url or NAMES_URL
    if dest.is_file() and _sha256(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    f.write(response.read())
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise DataError(
                    f"Could not download the names corpus from {url} ({reason}). Offline? Pass a names file "
                    f"with --data.path FILE or set ${ENV_VAR}=FILE (one name per line)."
                ) from None
        got = _sha256(tmp)
        if got != sha256:
            raise DataError(f"Downloaded {url} but its sha256 is {got}, expected {sha256}. Try again later.")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    rank_zero_info(f"Downloaded the names corpus to {dest}")
    return dest


# ---------------------------------------------------------------------------------------------------------
# loaders


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, rank, epoch), stable across processes and platforms."""
    digest = hashlib.sha256("-".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TrainBatches:
    """Training batches made by indexing the whole tensors at once, resumable mid-epoch.

    - ``sampling="random"``: each batch is drawn uniformly with replacement, like the lecture's
      ``torch.randint(0, N, (32,))``; indices are drawn in bulk, ``chunk`` batches at a time.
    - ``sampling="shuffle"``: a fresh permutation each epoch; the last partial batch is dropped, so no batch
      ever holds a single example (BatchNorm cannot normalise one).

    An epoch is ``len(self)`` batches, about one pass over the data. The batch stream is a pure function of
    (seed, rank, epoch, position): each rank trains on different batches, a run is reproducible, and
    `state_dict` / `load_state_dict` (which Lightning saves in checkpoints) resume it exactly.
    With ``world_size > 1`` shuffled epochs give every rank a disjoint share of the same permutation.
    """

    def __init__(
        self,
        X: Tensor,
        Y: Tensor,
        batch_size: int,
        seed: int,
        sampling: str = "random",
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 256,
    ) -> None:
        self.X, self.Y, self.batch_size, self.sampling = X, Y, batch_size, sampling
        self.seed, self.rank, self.world_size, self.chunk = seed, rank, world_size, chunk
        self.epoch, self.position = 0, 0  # position: batches of the current epoch already handed out

    def __len__(self) -> int:
        return max(1, len(self.X) // (self.batch_size * self.world_size))

    def _index_chunks(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Index tensors of shape (n, B) that together cover this rank's batches of one epoch."""
        steps = len(self)
        if self.sampling == "random":
            for start in range(0, steps, self.chunk):
                n = min(self.chunk, steps - start)
                yield torch.randint(0, len(self.X), (n, self.batch_size), generator=generator)
        else:
            perm = torch.randperm(len(self.X), generator=generator)
            used = steps * self.world_size * self.batch_size
            yield perm[:used].view(steps, self.world_size, self.batch_size)[:, self.rank]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.position >= len(self):  # the previous epoch ran to its end
            self.epoch, self.position = self.epoch + 1, 0
        # random sampling: every rank its own stream; shuffling: one permutation shared by all ranks
        rank_part = self.rank if self.sampling == "random" else 0
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, rank_part, self.epoch))
        done = 0
        for ix in self._index_chunks(generator):
            if done + len(ix) <= self.position:  # fast-forward a resumed epoch, a chunk at a time
                done += len(ix)
                continue
            ix = ix[self.position - done :] if self.position > done else ix
            done = self.position
            Xc, Yc = self.X[ix], self.Y[ix]  # (n, B, block_size), (n, B): one gather for n batches
            for batch in zip(Xc.unbind(0), Yc.unbind(0), strict=True):  # n views at once, not an index a batch
                self.position += 1
                yield batch
            done = self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.position = int(state_dict["epoch"]), int(state_dict["position"])


class EvalBatches:
    """Every example of a split exactly once, in order, sharded contiguously across ranks (no padding)."""

    def __init__(self, X: Tensor, Y: Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
        lo, hi = len(X) * rank // world_size, len(X) * (rank + 1) // world_size
        self.X, self.Y, self.batch_size = X[lo:hi], Y[lo:hi], batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.X) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.X), self.batch_size):
            yield self.X[i : i + self.batch_size], self.Y[i : i + self.batch_size]


class SampleRequests:
    """What `predict` iterates over: the sizes of the groups of names to generate (one group of 0 for none)."""

    def __init__(self, num_samples: int, per_batch: int, seed: int):
        self.sizes = [min(per_batch, num_samples - i) for i in range(0, num_samples, per_batch)] or [0]
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[dict[str, int]]:
        for i, n in enumerate(self.sizes):
            yield {"num": n, "seed": self.seed + i}


# ---------------------------------------------------------------------------------------------------------
# the DataModule


class NamesDataModule(L.LightningDataModule):
    """The makemore names corpus as a LightningDataModule, split and windowed like the lecture.

    Args:
        path: names file, one name per line. Default: ``$MAKEMORE_NAMES``, else the public makemore
            ``names.txt`` downloaded (once, sha256-checked) into ``~/.cache/lightning_makemore``.
        block_size: characters of context used to predict the next one.
        batch_size: training examples per batch, per device (the global batch is this × devices × nodes).
        sampling: ``"random"`` draws each batch uniformly with replacement (the lecture);
            ``"shuffle"`` walks shuffled epochs and drops the last partial batch.
        eval_batch_size: batch size for validation and test (the loss is exact whatever its value).
        seed: seeds the training batch order (each rank adds its rank).
        split_seed: the `random.seed` of the lecture's 80/10/10 shuffle of names.
        num_samples: how many names `predict` generates.
        sample_seed: seed of the first group of generated names (the lecture's 2147483647 + 10).

    Example::

        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "names.txt"
        >>> _ = path.write_text("emma\\nava\\nmia\\n")
        >>> dm = NamesDataModule(path=str(path), block_size=2)
        >>> dm.vocab.itos
        ('.', 'a', 'e', 'i', 'm', 'v')
        >>> dm.setup("fit"); dm.X_train.shape  # the windows of 2 of the 3 names (the 80 % train split)
        torch.Size([9, 2])
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 3,
        batch_size: int = 32,
        sampling: Literal["random", "shuffle"] = "random",
        eval_batch_size: int = 8192,
        seed: int = 2147483647,
        split_seed: int = 42,
        num_samples: int = 20,
        sample_seed: int = 2147483647 + 10,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"Expected block_size >= 1, but got {block_size}.")
        if batch_size < 1:
            raise ValueError(f"Expected batch_size >= 1, but got {batch_size}.")
        if eval_batch_size < 1:
            raise ValueError(f"Expected eval_batch_size >= 1, but got {eval_batch_size}.")
        if sampling not in ("random", "shuffle"):
            raise ValueError(f"Expected sampling 'random' or 'shuffle', but got {sampling!r}.")
        if num_samples < 1:
            raise ValueError(f"Expected num_samples >= 1, but got {num_samples}.")
        self.save_hyperparameters()
        self.path = path
        self.block_size, self.batch_size, self.sampling = block_size, batch_size, sampling
        self.eval_batch_size, self.seed, self.split_seed = eval_batch_size, seed, split_seed
        self.num_samples, self.sample_seed = num_samples, sample_seed
        self._names: list[str] | None = None
        self._vocab: Vocabulary | None = None
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    # -- where the file comes from -------------------------------------------------------------------
    def resolve_path(self) -> Path:
        """The file to read: `path`, else `$MAKEMORE_NAMES`, else the cached download."""
        if self.path:
            return Path(self.path).expanduser()
        if os.environ.get(ENV_VAR):
            return Path(os.environ[ENV_VAR]).expanduser()
        return default_cache_dir() / "names.txt"

    def prepare_data(self) -> None:
        """Download the corpus when no file was given (once, on one process per node); not for `predict`."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.PREDICTING:
            return  # sampling needs only the checkpoint
        if not self.path and not os.environ.get(ENV_VAR):
            download_names(self.resolve_path())

    def names(self) -> list[str]:
        """Every name of the corpus, read once (downloaded first when no file was given and none is cached)."""
        if self._names is None:
            self.prepare_data()
            self._names = read_names(self.resolve_path())
        return self._names

    @property
    def vocab(self) -> Vocabulary:
        """The corpus's vocabulary; the model is built with it (the CLI links it, see `cli.py`)."""
        if self._vocab is None:
            self._vocab = Vocabulary.from_names(self.names())
        return self._vocab

    def setup(self, stage: str) -> None:
        """Read, split and window the corpus. Seeded and idempotent; `predict` needs no data file."""
        if stage == "predict" or self.splits:
            return
        for split, words in zip(("train", "val", "test"), split_names(self.names(), self.split_seed), strict=True):
            self.splits[split] = build_windows(words, self.vocab, self.block_size)

    # -- loaders -------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.splits:
            raise RuntimeError(f"Call setup() before asking for the {name} loader.")
        return self.splits[name]

    def train_dataloader(self) -> TrainBatches:
        X, Y = self._split("train")
        rank, world = self._rank_world()
        return TrainBatches(X, Y, self.batch_size, self.seed, self.sampling, rank, world)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # our loaders yield tensors made where the data lives: skip Lightning's generic walk over the batch
        # when they are on the device already (a public hook; its cost is in benchmarks/results/speed.md)
        if isinstance(batch, tuple) and all(isinstance(t, Tensor) and t.device == device for t in batch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> EvalBatches:
        return EvalBatches(*self._split("val"), self.eval_batch_size, *self._rank_world())

    def test_dataloader(self) -> EvalBatches:
        return EvalBatches(*self._split("test"), self.eval_batch_size, *self._rank_world())

    def predict_dataloader(self) -> SampleRequests:
        # the names are printed: rank zero samples them all; the other ranks get one empty request (Lightning
        # refuses a loader of length zero)
        rank, _ = self._rank_world()
        return SampleRequests(self.num_samples if rank == 0 else 0, per_batch=self.num_samples, seed=self.sample_seed)

    @property
    def X_train(self) -> Tensor:
        return self._split("train")[0]
