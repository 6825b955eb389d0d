"""Train, evaluate and sample makemore's MLP: LightningCLI around `MakemoreModule` and `NamesDataModule`.

examples:
  python train.py fit                                             # the lecture's BatchNorm MLP, 200,000 steps
  python train.py fit --config configs/lecture/deep.yaml          # a preset (configs/, configs/lecture/)
  python train.py fit --model.n_hidden 300 --trainer.max_steps 50000
  python train.py test --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
  python train.py predict --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt --data.num_samples 50
  python train.py heal --config configs/lecture/original.yaml --trainer.max_steps 3000  # refit with the fixes

`python train.py fit --help` lists every flag: the model's and the data's first, then Lightning's Trainer.
Bad values fail before training with one line that says what is allowed (LIGHTNING_MAKEMORE_TRACEBACK=1
shows the full traceback).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from argparse import ArgumentError, RawDescriptionHelpFormatter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_makemore.cli_errors import NothingToTrain, UsageError, check_something_to_train, explain_argument_error
from lightning_makemore.data import DataError, NamesDataModule
from lightning_makemore.fastpath import FastPath
from lightning_makemore.module import MakemoreModule, check_batch_size
from lightning_makemore.progress import StepProgressBar
from lightning_makemore.summary import LayerSummary, print_fit_summary

PROGRESS_BAR_REFRESH = 50  # steps between progress-bar refreshes (Lightning's default, 1, is a cost per step)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def make_monitors(spikes: bool = False) -> list[Callback]:
    """The training-health monitors of the `callbacks` package as one callback, at their default cadence: the four
    monitors, the lecture's diagnoses and the health report (`health.md`); `spikes`: trace every step too."""
    from callbacks import HealthMonitor

    return [HealthMonitor(trace=spikes)]


class SteadyTensorBoardLogger(TensorBoardLogger):
    """Lightning's `TensorBoardLogger`, waiting for its writer thread (a flush) at most once every ``save_every_s``
    seconds while the run goes on, and always when it ends (success, error or interruption).

    Lightning asks a logger to ``save()`` after every logging step: for TensorBoard a flush that makes the training
    thread wait until the writer thread has written every queued event, about 0.5 ms, ~1.5 % of the lecture's step
    at the default ``log_every_n_steps``. The writer thread writes events as they come whether or not it is waited
    for, so a live TensorBoard sees the same scalars; the wait comes at most once a second, and at the end.

    Example::

        >>> import tempfile
        >>> logger = SteadyTensorBoardLogger(tempfile.mkdtemp(), save_every_s=1.0)
        >>> logger.save_every_s, type(logger).__mro__[1].__name__
        (1.0, 'TensorBoardLogger')
    """

    def __init__(self, *args: Any, save_every_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_every_s = save_every_s
        self._saved_at = -math.inf

    @override
    def save(self) -> None:
        now = time.monotonic()
        if now - self._saved_at < self.save_every_s:
            return
        self._saved_at = now
        super().save()

    @override
    def finalize(self, status: str) -> None:
        self._saved_at = -math.inf  # the end writes everything
        super().finalize(status)


class MakemoreCLI(LightningCLI):
    """LightningCLI with the lecture's defaults, monitors, checkpointing, a summary and name samples after `fit`."""

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # ours first in --help: the model's and the data's flags, ours, then Lightning's Trainer
        parser.add_lightning_class_args(self.model_class, "model")
        parser.add_lightning_class_args(self.datamodule_class, "data")
        parser.add_argument(
            "--monitors",
            type=bool,
            default=True,
            help="Log activation, gradient, parameter and update-ratio diagnostics to TensorBoard, check the "
            "network at initialisation and write a health report, health.md (the callbacks package). "
            "--monitors false turns them off.",
        )
        parser.add_argument(
            "--spikes",
            type=bool,
            default=False,
            help="With the monitors, also record a few numbers on every step (gradient norms, update ratios, "
            "activation RMS) so that a loss spike is reported with the layer that moved first. Slows this small "
            "model down (benchmarks/results/monitors.md); free on a large one.",
        )
        parser.add_argument(
            "--fix",
            type=str | None,
            default=None,
            help="Fixes with no flag of their own, applied when training starts (callbacks/fixes.py): "
            "KIND:TARGETS:VALUE, several separated by spaces, e.g. 'scale_lr:net.head.weight:0.1 "
            "scale_layer:net.blocks.0.linear:0.5'; a health report's rerun command writes them "
            "(lightning_makemore/heal.py).",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch intra-op threads. Default: 1 on CPU (fastest for a model this small), "
            "torch's own choice elsewhere.",
        )
        parser.add_argument(
            "--fast_path",
            type=bool,
            default=True,
            help="Skip Lightning's per-step bookkeeping that does nothing for this run (lightning_makemore/"
            "fastpath.py; same results). --fast_path false runs Lightning's public path only.",
        )
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the model is built from the data's vocabulary and context length (read when the data is created)
        parser.link_arguments("data", "model.vocab", compute_fn=self._data_vocab, apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size")
        parser.set_defaults({"trainer.max_steps": 200_000, "trainer.max_epochs": -1, "trainer.log_every_n_steps": 50})

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise UsageError(explain_argument_error(str(err))) from None

    def _data_vocab(self, data: NamesDataModule) -> list[str] | None:
        # sampling needs no data file: the model's vocabulary then comes from the checkpoint
        if self.subcommand == "predict":
            return None
        try:
            return list(data.vocab.itos)
        except DataError as err:  # raised once instantiation is over (jsonargparse would wrap it in a traceback)
            self._data_error = err
            return None

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer", {})
        threads = config.get("threads")
        accelerator = str(trainer.get("accelerator", "auto"))
        if threads is None and (accelerator == "cpu" or not torch.cuda.is_available()):
            threads = 1
        if threads is not None:
            if threads < 1:
                raise ValueError(f"Expected --threads >= 1, but got {threads}.")
            torch.set_num_threads(threads)
        if trainer.get("barebones"):
            trainer.log_every_n_steps = None  # our default of 50 would be refused: barebones logs nothing
        if self.subcommand == "fit":
            check_batch_size(config.model, config.data.batch_size)
            if (trainer.get("max_steps") or -1) <= 0 and (trainer.get("max_epochs") or -1) <= 0:
                raise ValueError(
                    "Expected --trainer.max_steps > 0 (or --trainer.max_epochs > 0): training would never end "
                    "and the lr schedule needs its length."
                )
        if trainer.get("sync_batchnorm") and not torch.cuda.is_available():
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
        if self.subcommand == "fit" and ckpt_path and os.path.isfile(ckpt_path):
            check_something_to_train(ckpt_path, trainer.get("max_steps"))
        if self.subcommand == "predict" and not ckpt_path:
            raise ValueError(
                "predict samples from a trained model: pass --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt."
            )
        if self.subcommand != "fit":
            self.save_config_callback = None  # config.yaml belongs to the run that trained the model

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        if getattr(self, "_data_error", None) is not None:
            raise self._data_error
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = config.get("trainer", {})
        ours: list[Callback] = []
        if self.subcommand == "fit" and not trainer_config.get("barebones"):
            if trainer_config.get("enable_checkpointing") is not False:
                ours += [
                    # the best weights by validation loss ...
                    ModelCheckpoint(
                        filename="step{step}-val{val/loss:.4f}",
                        auto_insert_metric_name=False,
                        monitor="val/loss",
                        mode="min",
                    ),
                    # ... and last.ckpt, always the latest weights (rewritten at every validation)
                    ModelCheckpoint(filename="last", monitor=None, save_top_k=1),
                ]
            if config.get("monitors", True):
                ours.extend(make_monitors(spikes=bool(config.get("spikes", False))))
            if config.get("fix"):
                from callbacks.fixes import ApplyFixes
                from lightning_makemore.heal import parse_fix

                ours.append(
                    ApplyFixes([parse_fix(f) for f in config.fix.split()], seed=config.get("seed_everything") or 0)
                )
        # the user's --trainer.callbacks are kept (passing `callbacks=` to super() replaces them)
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        given = _as_list(init.get("trainer", {}).get("callbacks"))
        users = [*given, *_as_list(self.trainer_defaults.get("callbacks"))]
        bar_given = any(isinstance(c, ProgressBar) for c in users)
        if (
            trainer_config.get("enable_progress_bar") is not False
            and not bar_given
            and not trainer_config.get("barebones")
        ):
            ours.append(StepProgressBar(refresh_rate=PROGRESS_BAR_REFRESH))
        if (
            self.subcommand == "fit"
            and trainer_config.get("enable_model_summary") is not False
            and not trainer_config.get("barebones")
            and not any(isinstance(c, ModelSummary) for c in users)
        ):
            ours.append(LayerSummary())
            kwargs["enable_model_summary"] = False  # Lightning would add its own, or say it skipped it
        self.fast_path = FastPath(enabled=config.get("fast_path", True))
        logger = self._default_logger(config, trainer_config)
        if logger is not None:
            kwargs["logger"] = logger
        trainer = super().instantiate_trainer(callbacks=[*given, *ours, self.fast_path], **kwargs)
        # the fast path may skip idle hooks of every callback but the user's (the CLI's, Lightning's defaults)
        self.fast_path.callbacks = [cb for cb in trainer.callbacks if not any(cb is u for u in users)]
        return trainer

    def _default_logger(self, config: Any, trainer_config: Any) -> Any:
        """The logger when the user chose none (`--trainer.logger` unset or true): Lightning's default
        TensorBoardLogger (a `SteadyTensorBoardLogger`), without its `hp_metric = -1` placeholder chart. predict
        logs nothing; validate/test from a checkpoint write into the run that trained it (no new empty
        lightning_logs/version_N). None: the user's own choice stands."""
        if trainer_config.get("logger") not in (None, True) or trainer_config.get("barebones"):
            return None  # the user's logger, or none at all in barebones mode
        if self.subcommand == "predict":
            return False
        ckpt = Path(config.get("ckpt_path") or "")
        if self.subcommand != "fit" and ckpt.is_file() and ckpt.parent.name == "checkpoints":
            run = ckpt.resolve().parent.parent  # .../lightning_logs/version_0
            save_dir, name, version = run.parent.parent, run.parent.name, run.name
            return SteadyTensorBoardLogger(save_dir=save_dir, name=name, version=version, default_hp_metric=False)
        # where and how Lightning's own default logger (`logger=True`) writes
        root = trainer_config.get("default_root_dir") or os.getcwd()
        if "://" not in str(root):
            root = os.path.normpath(os.path.expanduser(root))
        return SteadyTensorBoardLogger(save_dir=root, version=SLURMEnvironment.job_id(), default_hp_metric=False)

    @override
    def before_fit(self) -> None:
        self._fit_started = time.perf_counter()

    @override
    def after_fit(self) -> None:
        if self.trainer.interrupted:
            return
        seconds = time.perf_counter() - getattr(self, "_fit_started", time.perf_counter())
        # `trainer.log_dir` is a collective under DDP: read on every rank, printed on rank zero
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if self.trainer.is_global_zero:
            from lightning_makemore.heal import append_rerun

            append_rerun(self, log_dir)  # health.md ends with the command that reruns it with the fixes
        print_fit_summary(self.trainer, self.datamodule, self.model, seconds, log_dir)


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text)


# ---------------------------------------------------------------------------------------------------------
# the entry point


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's examples kept one per line."""


class _DropLightningTips(logging.Filter):
    """Lightning's product tips (litlogger, litmodels) and its seeding banner are not ours to say."""

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("Tip:" in text or "litlogger" in text or "litmodels" in text or "Seed set to" in text)


_DROP_TIPS = _DropLightningTips()


def _quiet_lightning() -> None:
    """Only what is ours to say: no seeding banner, no product tips, no deprecation warnings from inside
    Lightning, no callback warning when evaluating a checkpoint with other callbacks than it was trained with."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed", "lightning.pytorch"):
        logging.getLogger(name).addFilter(_DROP_TIPS)  # the same filter object: adding it again does nothing
    for message in (
        r".*LeafSpec.*",
        r".*Be aware that when using `ckpt_path`.*",
        r".*No seed found.*",
        r"(?s).*JsonargparseDeprecationWarning.*",  # LightningCLI's own use of jsonargparse
        r"(?s).*will be removed in v5\.0\.0.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message=r".*dirpath has changed from.*")


def main(args: list[str] | None = None) -> MakemoreCLI | None:
    """Entry point of `train.py`: runs the CLI and turns known user errors into one line on stderr."""
    _quiet_lightning()
    given = args if args is not None else sys.argv[1:]
    if given[:1] == ["heal"]:  # the repair loop: fits again with the report's fixes (lightning_makemore/heal.py)
        from lightning_makemore.heal import main as heal_main

        heal_main(given[1:])
        return None
    try:
        return MakemoreCLI(
            MakemoreModule,
            NamesDataModule,
            args=args,
            seed_everything_default=0,
            auto_configure_optimizers=False,  # the model has its own (--model.optimizer, --model.schedule)
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": __doc__, "exit_on_error": False, "formatter_class": _HelpFormatter},
        )
    except NothingToTrain as done:
        _print_rank_zero(str(done))  # not an error: exit status 0, no run folder
        return None
    except (DataError, ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get("LIGHTNING_MAKEMORE_TRACEBACK"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        if isinstance(err, UsageError):
            given = args if args is not None else sys.argv[1:]
            command = given[0] if given and given[0] in MakemoreCLI.subcommands() else ""
            print(f"Run `python train.py {command + ' ' if command else ''}--help` for every flag.", file=sys.stderr)
        sys.exit(2)
