"""The fast path: every speed trick of lightning_makemore that reaches into Lightning's internals, in one place.

Lightning does a fixed amount of bookkeeping around every hook of every training step (a profiler context, a
`_current_fx_name` assignment, signature inspection, a look-up of who overrides the batch hooks). For a model as
small as the lecture's MLP that bookkeeping is a large share of the step (measured in
``benchmarks/results/speed.md``). `FastPath`, one callback, takes the parts that do nothing for a given run out of
the training loop, for the duration of the training loop only:

1. Module step hooks left as LightningModule's empty methods are shadowed by ``None`` on the instance
   (Lightning calls a hook only if it is callable); ``configure_gradient_clipping`` too when nothing is clipped.
2. The module's class is swapped for a subclass (same name) that stores ``_current_fx_name``, which Lightning
   sets twice around every hook call, as a plain attribute instead of going through ``nn.Module.__setattr__``,
   and returns the batch at once from the identity batch hooks (``_call_batch_hook``) that neither the module
   nor the data module overrides.
3. ``training_step`` carries its ``__signature__`` (Lightning inspects the signature on every step).
4. On itself and the callbacks it may touch (``callbacks=``: those the caller created itself, or ``"all"`` when
   the user asks), the step hooks a callback does not override are shadowed by ``None``, and the per-step hook of
   a `ModelCheckpoint` that saves only after validation (no step or time trigger) too.
5. The logger connector refreshes the trainer's metric dictionaries after a training step only if something was
   logged since its last refresh (the module's ``log``, which ``log_dict`` calls, marks it): the refresh of a step
   that logged nothing puts back the values already there, and ``callback_metrics``, ``progress_bar_metrics`` and
   ``logged_metrics`` recompute them when read anyway.
6. The training loop's "does this batch only accumulate gradients?", asked about six times a step, is answered at
   once (no) while ``accumulate_grad_batches`` is 1.
7. Each ``self.log`` moves the logged metric's state to the value's device through a generic walk that deep-copies
   its metadata (0.27 ms); a state that its own ``to`` has put on that device already stays where it is.

It is applied only on the Lightning versions in the range it was tested on (`SUPPORTED`, the same range as the
monitors' own shortcut in ``callbacks/_internals.py``); elsewhere it does nothing and
Lightning's public path runs, with the same results. Everything is undone at the end of training, on an
exception and in ``teardown`` (each idempotent). Overridden hooks, gradient clipping and user callbacks that
were not handed over are never touched. The model, the training logic and the monitors read as if it did not
exist; ``train.py --fast_path false`` turns it off.

Example::

    >>> import lightning as L
    >>> trainer = L.Trainer(callbacks=[FastPath()], logger=False, enable_progress_bar=False)
    >>> any(isinstance(cb, FastPath) for cb in trainer.callbacks)
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from typing_extensions import override

#: the Lightning releases (major, minor) from the lowest to the newest the tricks were tested on with
#: tests/test_fastpath.py (both in CI: `make test-lowest` and `make test`); outside it the public path runs
SUPPORTED = ((2, 2), (2, 6))

#: module step hooks whose default (LightningModule's) does nothing
MODULE_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)
#: the callback hooks Lightning calls on every training step
CALLBACK_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)
#: batch hooks whose default (LightningModule's and LightningDataModule's) returns the batch unchanged
IDENTITY_BATCH_HOOKS = ("on_before_batch_transfer", "on_after_batch_transfer")


def supported(version: str = L.__version__) -> bool:
    """Whether this Lightning version is in the range the tricks were tested on.

    Example::

        >>> supported("2.6.6"), supported("2.4.0"), supported("2.1.3"), supported("3.0.0")
        (True, True, False, False)
    """
    major, minor = version.split(".")[:2]
    return SUPPORTED[0] <= (int(major), int("".join(c for c in minor if c.isdigit()) or 0)) <= SUPPORTED[1]


class FastPath(Callback):
    """Applies the fast path at the start of training and undoes it at its end, on exception and in teardown.

    Args:
        callbacks: the callbacks whose idle step hooks it may shadow: those the caller created itself
            (the CLI passes its own), ``"all"`` for every callback of the trainer, or none (the default).
        enabled: False leaves everything as Lightning has it (the public path).

    Example::

        trainer = L.Trainer(callbacks=[FastPath(callbacks="all")])
    """

    def __init__(self, callbacks: Sequence[Callback] | Literal["all"] = (), enabled: bool = True) -> None:
        self.callbacks = callbacks
        self.enabled = enabled
        self.active = False  # True while the tricks are applied (tests read it)
        self._module: L.LightningModule | None = None
        self._module_class: type | None = None
        self._shadowed: list[tuple[Any, str]] = []
        self._signature_set_on: Any = None
        self._connector: Any = None
        self._epoch_loop: Any = None

    # -- applying ------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not supported() or self.active:
            return
        self.active = True
        self._module, self._module_class = pl_module, type(pl_module)
        # 1. the module's empty step hooks
        hooks = list(MODULE_STEP_HOOKS)
        if trainer.gradient_clip_val is None:  # the default hook clips only when that is set
            hooks.append("configure_gradient_clipping")
        for hook in hooks:
            if getattr(type(pl_module), hook) is getattr(L.LightningModule, hook):
                self._shadow(pl_module, hook)
        # 2. the module's class: plain `_current_fx_name`, identity batch hooks answered at once
        datamodule = trainer.datamodule
        identity = frozenset(
            hook
            for hook in IDENTITY_BATCH_HOOKS
            if getattr(type(pl_module), hook) is getattr(L.LightningModule, hook)
            and (datamodule is None or getattr(type(datamodule), hook) is getattr(L.LightningDataModule, hook))
        )
        object.__setattr__(pl_module, "_fastpath_identity_hooks", identity)
        pl_module.__class__ = _fast_class(type(pl_module))
        # 3. training_step's signature, computed once
        step = getattr(self._module_class.training_step, "__func__", self._module_class.training_step)
        if "__signature__" not in vars(step):
            step.__signature__ = inspect.signature(step)
            self._signature_set_on = step
        # 5. the logger connector's refresh of the logged metrics, on the training steps that logged nothing
        connector = trainer._logger_connector
        object.__setattr__(pl_module, "_fastpath_logged", True)
        object.__setattr__(pl_module, "_fastpath_in_place", [])  # 7. logged-metric states given a quick `to`
        connector.on_batch_end = _refresh_if_logged(trainer, pl_module, connector.on_batch_end)
        self._connector = connector
        # 6. whether this batch only accumulates: never while one batch makes one step (asked ~6 times a step)
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._should_accumulate = _accumulates_if_asked(trainer, epoch_loop._should_accumulate)
        self._epoch_loop = epoch_loop
        # 4. the idle step hooks of the callbacks it may touch, its own first (it has no step hook of its own)
        allowed = trainer.callbacks if self.callbacks == "all" else self.callbacks
        for cb in (self, *(cb for cb in allowed if cb is not self)):
            if cb not in trainer.callbacks or getattr(cb, "__dict__", None) is None:
                continue
            for hook in CALLBACK_STEP_HOOKS:
                if getattr(type(cb), hook, None) is getattr(Callback, hook):
                    self._shadow(cb, hook)
            if isinstance(cb, ModelCheckpoint) and _saves_only_after_validation(cb, pl_module):
                self._shadow(cb, "on_train_batch_end")

    def _shadow(self, obj: Any, hook: str) -> None:
        if hook not in obj.__dict__:
            object.__setattr__(obj, hook, None)
            self._shadowed.append((obj, hook))

    # -- undoing -------------------------------------------------------------------------------------
    def restore(self) -> None:
        """Undo everything (idempotent): hooks, the module's class, the cached signature."""
        for obj, hook in self._shadowed:
            if obj.__dict__.get(hook, 0) is None:
                del obj.__dict__[hook]
        self._shadowed = []
        module, self._module = self._module, None
        if module is not None and self._module_class is not None:
            module.__class__ = self._module_class
            module.__dict__.pop("_fastpath_identity_hooks", None)
        self._module_class = None
        if module is not None:
            module.__dict__.pop("_fastpath_logged", None)
            for metric in module.__dict__.pop("_fastpath_in_place", ()):
                metric.__dict__.pop("to", None)
        connector, self._connector = self._connector, None
        if connector is not None:
            connector.__dict__.pop("on_batch_end", None)
        epoch_loop, self._epoch_loop = self._epoch_loop, None
        if epoch_loop is not None:
            epoch_loop.__dict__.pop("_should_accumulate", None)
        if self._signature_set_on is not None:
            self._signature_set_on.__dict__.pop("__signature__", None)
            self._signature_set_on = None
        self.active = False

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.restore()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()


def _saves_only_after_validation(cb: ModelCheckpoint, pl_module: L.LightningModule) -> bool:
    """Whether `cb.on_train_batch_end` returns without doing anything on every step (no step or time trigger)."""
    return (
        pl_module.automatic_optimization
        and getattr(cb, "_every_n_train_steps", 1) < 1
        and getattr(cb, "_train_time_interval", 1) is None
    )


def _refresh_if_logged(trainer: L.Trainer, module: L.LightningModule, refresh: Any) -> Any:
    """The logger connector's ``on_batch_end`` that refreshes the trainer's metric dictionaries only if something
    was logged since the last refresh, or outside a training step.

    The refresh recomputes every logged metric's step value (a tensor-to-number copy for the progress bar
    included) on every batch, about 30 us, 4 % of the lecture's step. On a training step that logged nothing, it
    would put back the values the dictionaries already hold (a logged value is cached when it is logged), and
    ``callback_metrics`` and its siblings recompute them when read anyway; the batch reference is still dropped.
    """
    state = trainer.state

    def on_batch_end() -> None:
        if module.__dict__["_fastpath_logged"] or state.stage is not RunningStage.TRAINING:
            module.__dict__["_fastpath_logged"] = False
            refresh()
        else:
            results = trainer.fit_loop.epoch_loop._results
            results.batch = None
            results.batch_size = None

    return on_batch_end


def _keep_in_place(metrics: Any, patched: list[Any]) -> None:
    """Gives each of Lightning's logged-metric states (``_ResultMetric``) a ``to`` that returns at once when asked
    for the device it was last moved to by its own ``to``.

    Lightning calls ``state.to(value.device)`` on every ``self.log``: a generic walk over the state's attributes
    that deep-copies its metadata, about 0.27 ms a call on the CPU, 2 % of the lecture's step at the default
    cadence, where the state is on that device already. Anything else (another device, keyword arguments, the
    epoch's end moving the states to the CPU) goes through Lightning's ``to``, which sets what is remembered.
    """
    for metric in metrics:
        if "to" in metric.__dict__:
            continue
        moved_to: list[Any] = [None]
        to = metric.to

        def in_place(*args: Any, _to: Any = to, _moved: list[Any] = moved_to, _m: Any = metric, **kwargs: Any) -> Any:
            device = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.device) else None
            if device is not None and device == _moved[0]:
                return _m
            _moved[0] = None
            result = _to(*args, **kwargs)
            _moved[0] = device
            return result

        object.__setattr__(metric, "to", in_place)
        patched.append(metric)


def _accumulates_if_asked(trainer: L.Trainer, should_accumulate: Any) -> Any:
    """The epoch loop's ``_should_accumulate``, answered at once while ``accumulate_grad_batches`` is 1: every batch
    completes an accumulation then, and Lightning's answer is False whatever the strategy (a callback such as
    ``GradientAccumulationScheduler`` may raise it later: then Lightning's own answer is asked)."""

    def _should_accumulate() -> bool:
        return trainer.accumulate_grad_batches != 1 and should_accumulate()

    return _should_accumulate


@functools.cache
def _fast_class(cls: type[L.LightningModule]) -> type[L.LightningModule]:
    """`cls` with the per-step shortcuts of Lightning's internals (a plain ``_current_fx_name``, the identity batch
    hooks, the mark of a logged value); same name, so logs and errors read the same."""

    class Fast(cls):  # type: ignore[valid-type,misc]
        def __setattr__(self, name: str, value: Any) -> None:
            # a plain string attribute, stored exactly as nn.Module would store it, minus its
            # Parameter/Module/buffer checks
            if name == "_current_fx_name":
                object.__setattr__(self, name, value)
            else:
                super().__setattr__(name, value)

        def _call_batch_hook(self, hook_name: str, *args: Any) -> Any:
            # Lightning looks up on every batch which of the module and the data module overrides each batch
            # hook; neither overrides these (checked when applied), whose default returns the batch as it is
            if hook_name in self.__dict__["_fastpath_identity_hooks"]:
                return args[0]
            return super()._call_batch_hook(hook_name, *args)

        def log(self, *args: Any, **kwargs: Any) -> None:
            # every logged value goes through here (log_dict calls log): the next refresh is needed
            self.__dict__["_fastpath_logged"] = True
            super().log(*args, **kwargs)
            trainer = self._trainer
            if trainer is not None and trainer._results is not None:
                _keep_in_place(trainer._results.values(), self.__dict__["_fastpath_in_place"])

    Fast.__name__, Fast.__qualname__, Fast.__module__ = cls.__name__, cls.__qualname__, cls.__module__
    return Fast
