"""Everything the monitors take from Lightning's private internals, in one place, gated on the tested versions.

Two things, both on Lightning 2.2 to 2.6 (the versions the test suite ran on):

- **The sleep trick** (speed only): while a monitor (or a ``CallbackGroup``) has nothing to do until a later
  step, its training-step hooks are shadowed by ``None`` on the instance. Lightning calls a callback's hook
  only if ``callable(getattr(callback, name))``, so a shadowed hook costs nothing instead of a call inside a
  profiler context. Elsewhere (another Lightning, or ``SHADOW_STEP_HOOKS = False``) the hooks are called and
  return at once: the same results, a little slower (``tests/test_callbacks_group.py`` checks both).
- **The batch axis of manual optimization**: with ``automatic_optimization = False`` Lightning's ``self.log``
  writes on ``fit_loop.epoch_loop._batches_that_stepped`` (one per training batch), while the public
  ``trainer.global_step`` counts every optimizer's steps (two a batch for a GAN). Lightning's own
  ``LearningRateMonitor`` logs on the same private counter. On an untested Lightning the monitors fall back to
  ``global_step`` and say so once. With automatic optimization the public ``global_step`` is that axis.

- **The legacy state key** (``Callback._legacy_state_key``, the key of a callback's state in checkpoints of
  older Lightning releases, which Lightning itself falls back to): ``CallbackGroup`` loads its members' states
  the way Lightning would. On an untested release only the current ``state_key`` is read.

- **A LightningModule compiled before ``fit``** (``trainer.fit(torch.compile(model))``): Lightning unwraps it
  and keeps the compiled functions in ``LightningModule._compiler_ctx``. The monitors read it to know that
  recording steps must run eagerly (``callbacks._compile``). On an untested release they assume it is, which
  only costs eager recording steps for a model that was not compiled (the same results).

Nothing else in ``callbacks/`` touches a private Lightning attribute.
"""

import os

import lightning
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


#: the Lightning releases (major, minor) on which the tricks below were tested
TESTED = ((2, 2), (2, 6))
LIGHTNING = _minor(lightning.__version__)
IS_TESTED = TESTED[0] <= LIGHTNING <= TESTED[1]

#: shadow idle step hooks by None (the sleep trick); off on untested Lightning releases or with
#: ``CALLBACKS_NO_SHADOW=1``, and a test switches it off to compare results
SHADOW_STEP_HOOKS = IS_TESTED and os.environ.get("CALLBACKS_NO_SHADOW", "") != "1"

#: the training-step hooks after ``on_train_batch_start``, which a sleeping monitor does not need
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
