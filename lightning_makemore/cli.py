"""The command line: LightningCLI around `MakemoreModule` and `NamesDataModule` (run it as `python train.py`).

    python train.py fit                                  # the lecture's BatchNorm MLP, 200,000 steps
    python train.py fit --config configs/deep.yaml       # a preset
    python train.py fit --model.n_hidden 300 --data.batch_size 64 --trainer.max_steps 50000
    python train.py test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    python train.py predict --ckpt_path .../last.ckpt --data.num_samples 50   # no data file needed

Bad values fail before training with one line that says what is allowed (set LIGHTNING_MAKEMORE_TRACEBACK=1
for the full traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_makemore.data import DataError, NamesDataModule
from lightning_makemore.module import MakemoreModule, check_batch_size

PROGRESS_BAR_REFRESH = 50  # steps between progress-bar refreshes (Lightning's default, 1, is a cost per step)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


class ModelCheckpoint(pl_callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint with last.ckpt always the latest weights, its `state_key` computed once and
    no per-step work when it has none.

    Lightning formats every callback's `state_key` on every hook call (six times a step); ModelCheckpoint's
    builds it from five settings each time, ~3 % of this model's step. Same class name, so the same key in
    checkpoints as Lightning's own.
    """

    _cached_state_key: str | None = None

    @property
    @override
    def state_key(self) -> str:
        if self._cached_state_key is None:
            self._cached_state_key = super().state_key
        return self._cached_state_key

    # Lightning writes last.ckpt only when it also writes a top-k checkpoint (at the end of a validation, or of
    # the epoch when validation runs every epoch): a run whose last validation did not improve would end with a
    # last.ckpt of older weights. Ours always holds the latest.
    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_too(trainer, at_epoch_end=True)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_too(trainer, at_epoch_end=False)

    def _save_last_too(self, trainer: L.Trainer, at_epoch_end: bool) -> None:
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)  # skipped when this step is saved already
            and self._should_save_on_train_epoch_end(trainer) == at_epoch_end
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # saving by step count or by time is off (the default here: it saves after validation): Lightning's
        # method would check the trainer's state (~15 us) before finding that out
        if pl_module.automatic_optimization and self._every_n_train_steps < 1 and self._train_time_interval is None:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


# hooks that run before training starts: a callback overriding nothing else has no work left once it starts
_START_ONLY_HOOKS = frozenset(
    {"setup", "on_fit_start", "on_sanity_check_start", "on_sanity_check_end", "on_train_start"}
)


def _only_start_hooks(callback: Callback) -> bool:
    overridden = {
        name
        for name, base in vars(Callback).items()
        if callable(base) and not name.startswith("_") and getattr(type(callback), name, base) is not base
    }
    return overridden <= _START_ONLY_HOOKS


# the callback hooks Lightning calls on every training step
_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class SkipIdleCallbacks(Callback):
    """Takes the callback hooks that do nothing out of the step loop, for the duration of training.

    Lightning calls every hook of every callback on every step, about 40 us a callback a step: a quarter of
    this model's own step for ModelSummary and the CLI's SaveConfigCallback, which only act at the start.
    Those (and this callback) leave the list; of the others, each step hook a callback does not override
    (``Callback``'s empty method) is shadowed by ``None`` on the instance, which Lightning skips (it calls a
    hook only if it is callable). `restore` puts everything back (the CLI calls it after `fit`).
    """

    def __init__(self) -> None:
        self.original: list[Callback] | None = None
        self.shadowed: list[tuple[Callback, str]] = []

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.original = list(trainer.callbacks)
        kept = [cb for cb in self.original if cb is not self and not _only_start_hooks(cb)]
        for cb in kept:
            attrs = getattr(cb, "__dict__", None)
            for hook in _STEP_HOOKS if attrs is not None else ():
                if getattr(type(cb), hook, None) is getattr(Callback, hook) and hook not in attrs:
                    attrs[hook] = None
                    self.shadowed.append((cb, hook))
        trainer.callbacks = kept

    def restore(self, trainer: L.Trainer) -> None:
        for cb, hook in self.shadowed:
            cb.__dict__.pop(hook, None)
        self.shadowed = []
        if self.original is not None:
            trainer.callbacks, self.original = self.original, None


def make_monitors() -> list[Callback]:
    """The four training-health monitors of the `callbacks` package, at their default cadence.

    Grouped into one callback: Lightning's dispatch of every hook to every callback would otherwise cost
    about 15 % of this small model's step before the monitors do any work.
    """
    from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor

    return [CallbackGroup([ActivationMonitor(), GradientMonitor(), ParameterMonitor(), UpdateRatioMonitor()])]


class MakemoreCLI(LightningCLI):
    """LightningCLI with the lecture's defaults, monitors, checkpointing and name samples after `fit`."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--monitors",
            type=bool,
            default=True,
            help="Log activation, gradient, parameter and update-ratio diagnostics to TensorBoard "
            "(the callbacks package). --monitors false turns them off.",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch intra-op threads. Default: 1 on CPU (fastest for a model this small), "
            "torch's own choice elsewhere.",
        )
        parser.set_defaults(
            {
                "trainer.max_steps": 200_000,
                "trainer.max_epochs": -1,
                "trainer.log_every_n_steps": 50,
            }
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("threads")
        accelerator = str(config.get("trainer", {}).get("accelerator", "auto"))
        if threads is None and (accelerator == "cpu" or not torch.cuda.is_available()):
            threads = 1
        if threads is not None:
            if threads < 1:
                raise ValueError(f"Expected --threads >= 1, but got {threads}.")
            torch.set_num_threads(threads)
        if self.subcommand == "fit":
            check_batch_size(config.model, config.data.batch_size)
        if config.get("trainer", {}).get("sync_batchnorm") and not torch.cuda.is_available():
            raise ValueError(
                "--trainer.sync_batchnorm true needs CUDA GPUs (torch's SyncBatchNorm has no CPU version): "
                "drop the flag on CPU, where each process normalises its own batch."
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not os.path.isfile(ckpt_path):
            raise FileNotFoundError(
                f"Checkpoint not found: {ckpt_path}. Pass a .ckpt file written by `train.py fit`, "
                "e.g. lightning_logs/version_0/checkpoints/last.ckpt."
            )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._skip_idle = SkipIdleCallbacks()
        extra: list[Callback] = [self._skip_idle]
        if self.subcommand == "fit":
            extra.append(
                ModelCheckpoint(
                    filename="step{step}-val{val/loss:.4f}",
                    auto_insert_metric_name=False,
                    monitor="val/loss",
                    mode="min",
                    save_last=True,
                )
            )
            if config.get("monitors", True):
                extra.extend(make_monitors())
        # the user's --trainer.callbacks first (passing `callbacks=` to super() would replace them)
        user = kwargs.pop("callbacks", None) or self._get(self.config_init, "trainer", default={}).get("callbacks")
        callbacks = _as_list(user)
        given = [*callbacks, *_as_list(self.trainer_defaults.get("callbacks"))]
        bar_given = any(isinstance(c, ProgressBar) for c in given)
        if config.get("trainer", {}).get("enable_progress_bar") is not False and not bar_given:
            # refreshing the bar on every step costs ~15 % of this model's step; the loss on it changes every
            # log_every_n_steps anyway
            extra.append(TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH))
        return super().instantiate_trainer(callbacks=callbacks + extra, **kwargs)

    @override
    def after_fit(self) -> None:
        self._skip_idle.restore(self.trainer)
        if self.trainer.interrupted:
            return
        self._print_samples()

    @rank_zero_only
    def _print_samples(self) -> None:
        dm: NamesDataModule = self.datamodule
        names = self.model.sample(dm.num_samples, seed=dm.sample_seed)
        print(f"\n{len(names)} names sampled from the trained model:\n" + "\n".join(names))


def main(args: list[str] | None = None) -> MakemoreCLI | None:
    """Entry point of `train.py`: runs the CLI and turns known user errors into one line on stderr."""
    try:
        return MakemoreCLI(
            MakemoreModule,
            NamesDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": __doc__},
        )
    except (DataError, ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("LIGHTNING_MAKEMORE_TRACEBACK"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
