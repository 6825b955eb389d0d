"""Every private attribute ``callbacks/`` reads, in one place, each gated on the versions it was tested with.

Lightning 2.2 to 2.6 (``LIGHTNING_TESTED``: the lowest version ``pyproject.toml`` allows and the newest, both in
CI) and torch 2.13 (``TORCH_TESTED``). Elsewhere each falls back to the public path, with the same results:

- **The sleep trick** (speed only): while the recorder has nothing to record until a later step, its
  training-step hooks are shadowed by ``None`` on the instance. Lightning calls a callback's hook only if
  ``callable(getattr(callback, name))``, so a shadowed hook costs nothing instead of a call inside a profiler
  context. Elsewhere (another Lightning, or ``CALLBACKS_NO_SHADOW=1``) the hooks are called and return at once
  (``tests/test_callbacks_group.py`` checks both give the same logs).
- **The batch axis of manual optimization**: with ``automatic_optimization = False`` Lightning's ``self.log``
  writes on ``fit_loop.epoch_loop._batches_that_stepped`` (one per training batch), while the public
  ``trainer.global_step`` counts every optimizer's steps (two a batch for a GAN). Lightning's own
  ``LearningRateMonitor`` logs on the same private counter. Elsewhere the monitors log on ``global_step`` and
  say so once. With automatic optimization the public ``global_step`` is that axis.
- **The legacy state key** (``Callback._legacy_state_key``, the key of a callback's state in checkpoints of older
  Lightning releases, which Lightning itself falls back to): ``CallbackGroup`` loads its members' states the way
  Lightning would. Elsewhere only the current ``state_key`` is read.
- **A LightningModule compiled before ``fit``** (``trainer.fit(torch.compile(model))``): Lightning unwraps it and
  keeps the compiled functions in ``LightningModule._compiler_ctx``. Elsewhere the monitors assume it is, which
  only costs eager recorded steps for a model that was not compiled (the same results).
- **A logger's metric prefix** (``TensorBoardLogger(prefix=...)``, ``WandbLogger(prefix=...)``: ``logger._prefix``,
  no public accessor): the writers that bypass ``log_metrics`` apply it as the logger would. Elsewhere they read
  no prefix and the TensorBoard writer goes through ``log_metrics``.
- **One TensorBoard event per step** (speed only): torch's ``SummaryWriter.add_scalar`` writes one event per
  value; the writer puts a step's scalars into one event through the writer's ``_get_file_writer()``. Elsewhere,
  one ``add_scalar`` per value. The figure process writes its images through the same file writer, as PNGs it
  encodes at zlib level 1 (``write_image_event``: the same pixels as ``add_image``'s level 6, in under half the
  time, for files some 10 % larger). Elsewhere, ``add_image``.
- **TensorBoard's record checksums in C** (speed only): TensorBoard frames every event record with two masked
  CRC-32C checksums, which its writer thread computes in pure Python (~0.12 us a byte: a recorded step's 1 KB
  event holds the GIL some 0.2 ms, and the training thread waits for it). Where ``google-crc32c``'s C
  implementation is installed (a dependency of this project, not of ``callbacks/``), the record writer of the
  ``SummaryWriter`` the monitors write to (``writer._get_file_writer().event_writer._async_writer._writer``)
  computes the same bytes with it (``fast_checksums``). Elsewhere (another TensorBoard, no C implementation),
  TensorBoard's own.
- **The type ``torch.compile`` returns for a module** (``torch._dynamo.OptimizedModule``; torch has no public
  name for it): a compiled submodule makes recorded steps run eagerly (``callbacks._compile``). Where torch has
  no such type, no submodule counts as compiled.

Outside Lightning and torch, ``callbacks._warnings`` compares Python's ``warnings._showwarnmsg_impl`` with its
value at import, to tell whether someone else shows the warnings (pytest, a custom handler); nothing else in
``callbacks/`` reads a private attribute.
"""

import functools
import os
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

if TYPE_CHECKING:
    import numpy as np


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


#: the Lightning releases (major, minor) the tricks were tested on: the lowest allowed and the newest, both in CI
LIGHTNING_TESTED = ((2, 2), (2, 6))
LIGHTNING = _minor(lightning.__version__)
IS_TESTED = LIGHTNING_TESTED[0] <= LIGHTNING <= LIGHTNING_TESTED[1]
#: the torch releases the TensorBoard shortcut was tested on
TORCH_TESTED = ((2, 13), (2, 13))
TORCH_IS_TESTED = TORCH_TESTED[0] <= _minor(torch.__version__) <= TORCH_TESTED[1]

#: shadow idle step hooks by None (the sleep trick); off on untested Lightning releases or with
#: ``CALLBACKS_NO_SHADOW=1``, and a test switches it off to compare results
SHADOW_STEP_HOOKS = IS_TESTED and os.environ.get("CALLBACKS_NO_SHADOW", "") != "1"

#: the training-step hooks after ``on_train_batch_start``, which a sleeping recorder does not need
STEP_HOOKS = (
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


def compiled_by_lightning(pl_module: "pl.LightningModule") -> bool:
    """Whether Lightning unwrapped a compiled LightningModule passed to ``fit`` (True when unsure)."""
    return getattr(pl_module, "_compiler_ctx", None) is not None if IS_TESTED else True


def optimized_module_type() -> type | None:
    """``torch._dynamo.OptimizedModule``, the wrapper ``torch.compile(module)`` returns, or None."""
    return getattr(getattr(torch, "_dynamo", None), "OptimizedModule", None)


def legacy_state_key(callback: Callback) -> str | None:
    """The key under which an older Lightning saved ``callback``'s state, or None (untested Lightning)."""
    return getattr(callback, "_legacy_state_key", None) if IS_TESTED else None


def shadow_step_hooks(callback: Callback, shadow: bool) -> None:
    """Shadows the callback's ``STEP_HOOKS`` by None on the instance (``shadow``), or restores its methods.

    Only while ``SHADOW_STEP_HOOKS`` is on; restoring works either way (the switch may change between fits).
    """
    for hook in STEP_HOOKS:
        if shadow and SHADOW_STEP_HOOKS:
            callback.__dict__[hook] = None
        else:
            callback.__dict__.pop(hook, None)


_warned_axis = False


def batch_axis(trainer: "pl.Trainer") -> int:
    """Lightning's logging step under manual optimization: training batches so far (``self.log``'s x axis)."""
    global _warned_axis
    if IS_TESTED:
        return trainer.fit_loop.epoch_loop._batches_that_stepped
    if not _warned_axis:
        _warned_axis = True
        rank_zero_warn(
            f"The monitors were not tested with manual optimization on Lightning {lightning.__version__}: they"
            " log on `trainer.global_step`, which counts every optimizer's steps, not on `self.log`'s batch axis."
        )
    return trainer.global_step


def logger_prefix(logger: Any) -> str | None:
    """The metric prefix of a TensorBoard or W&B logger: ``""`` when none, None when unknown (untested Lightning)."""
    return str(getattr(logger, "_prefix", "") or "") if IS_TESTED else None


def _file_writer(writer: Any) -> Any:
    """The file writer of torch's ``SummaryWriter`` (``_get_file_writer()``), to which the two functions below add
    one summary each; None on an untested torch or another writer (tensorboardX has its own protos)."""
    from torch.utils.tensorboard import SummaryWriter

    if not TORCH_IS_TESTED or type(writer) is not SummaryWriter:
        return None
    return writer._get_file_writer()


def write_scalars_event(writer: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Writes scalars as one TensorBoard event: the values ``add_scalar`` would write one event each for.

    A recorded step of the four monitors has some 15 scalars; one ``add_scalar`` is a proto, an event and a queue
    put each, one event holding all of them costs about as much as one of those. Returns False (nothing written)
    where :func:`_file_writer` finds none.
    """
    file_writer = _file_writer(writer)
    if file_writer is None:
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto

    summary = SummaryProto(value=[SummaryProto.Value(tag=tag, simple_value=float(v)) for tag, v in metrics.items()])
    file_writer.add_summary(summary, step)
    return True


#: zlib level of the figures' PNGs (``write_image_event``): 1 encodes a lecture figure in 6-10 ms, TensorBoard's
#: ``add_image`` (PIL's default, 6) in 16-31 ms with its float copy of the array, for files 10-20 % smaller
PNG_LEVEL = 1


def write_image_event(writer: Any, tag: str, image: "np.ndarray", step: int) -> bool:
    """Writes an ``(H, W, 3)`` uint8 ``image`` as TensorBoard image ``tag`` at ``step``: the summary
    ``add_image(tag, image, step, dataformats="HWC")`` writes, its PNG encoded at :data:`PNG_LEVEL`.

    Returns False (nothing written) where :func:`_file_writer` finds none.
    """
    file_writer = _file_writer(writer)
    if file_writer is None:
        return False
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary as SummaryProto

    height, width, channels = image.shape
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG", compress_level=PNG_LEVEL)
    proto = SummaryProto.Image(height=height, width=width, colorspace=channels, encoded_image_string=png.getvalue())
    file_writer.add_summary(SummaryProto(value=[SummaryProto.Value(tag=tag, image=proto)]), step)
    return True


#: the TensorBoard releases whose record writer ``fast_checksums`` was tested with (the floor ``pyproject.toml``
#: allows, to the newest in CI)
TENSORBOARD_TESTED = ((2, 14), (2, 21))


@functools.lru_cache(maxsize=1)
def _c_masked_crc32c() -> Callable[[bytes], int] | None:
    """TensorBoard's ``masked_crc32c`` computed by ``google-crc32c``'s C implementation, or None where there is none
    (or it disagrees with TensorBoard's on a few records: then TensorBoard's own is kept)."""
    try:
        import google_crc32c
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
        from tensorboard.version import VERSION
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", None) != "c":
        return None
    if not TENSORBOARD_TESTED[0] <= _minor(VERSION) <= TENSORBOARD_TESTED[1]:
        return None

    def masked(data: bytes) -> int:
        x = google_crc32c.value(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    samples = [b"", b"a", bytes(range(256)) * 3, struct.pack("<Q", 1234567)]
    return masked if all(masked(d) == masked_crc32c(d) for d in samples) else None


def _write_record(file: Any, masked: Callable[[bytes], int], data: bytes) -> None:
    """TensorBoard's ``RecordWriter.write`` (the TFRecord framing: length, its checksum, the data, its checksum)."""
    header = struct.pack("<Q", len(data))
    file.write(header + struct.pack("<I", masked(header)) + data + struct.pack("<I", masked(data)))


def fast_checksums(writer: Any) -> bool:
    """Makes torch's ``SummaryWriter`` ``writer`` checksum its records in C (see the module docstring); returns whether
    its records are checksummed in C now. The same bytes on disk either way (``tests/test_loggers.py``)."""
    from torch.utils.tensorboard import SummaryWriter

    masked = _c_masked_crc32c()
    if masked is None or type(writer) is not SummaryWriter:
        return False
    try:
        from tensorboard.summary.writer.record_writer import RecordWriter

        records = writer._get_file_writer().event_writer._async_writer._writer
    except (AttributeError, ImportError):
        return False
    if type(records) is not RecordWriter or not hasattr(records, "_writer"):
        return False
    if "write" not in vars(records):  # (the writer thread calls `records.write`: the instance's, from now on)
        records.write = functools.partial(_write_record, records._writer, masked)
    return True
