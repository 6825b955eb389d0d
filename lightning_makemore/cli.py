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
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_makemore.data import DataError, NamesDataModule
from lightning_makemore.fastpath import FastPath
from lightning_makemore.module import MakemoreModule, check_batch_size

PROGRESS_BAR_REFRESH = 50  # steps between progress-bar refreshes (Lightning's default, 1, is a cost per step)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


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
        parser.add_argument(
            "--fast_path",
            type=bool,
            default=True,
            help="Skip Lightning's per-step bookkeeping that does nothing for this run (lightning_makemore/"
            "fastpath.py; same results). --fast_path false runs Lightning's public path only.",
        )
        # the model is built from the data's vocabulary and context length (read when the data is created)
        parser.link_arguments("data", "model.vocab", compute_fn=self._data_vocab, apply_on="instantiate")
        parser.link_arguments("data.block_size", "model.block_size")
        parser.set_defaults(
            {
                "trainer.max_steps": 200_000,
                "trainer.max_epochs": -1,
                "trainer.log_every_n_steps": 50,
            }
        )

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
        if getattr(self, "_data_error", None) is not None:
            raise self._data_error
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_config = config.get("trainer", {})
        ours: list[Callback] = []
        if self.subcommand == "fit":
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
                ours.extend(make_monitors())
        # the user's --trainer.callbacks are kept (passing `callbacks=` to super() replaces them)
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        given = _as_list(init.get("trainer", {}).get("callbacks"))
        users = [*given, *_as_list(self.trainer_defaults.get("callbacks"))]
        bar_given = any(isinstance(c, ProgressBar) for c in users)
        if trainer_config.get("enable_progress_bar") is not False and not bar_given:
            # Lightning's default bar refreshes every step, a cost per step; the loss on it changes every
            # log_every_n_steps anyway
            ours.append(TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH))
        self.fast_path = FastPath(enabled=config.get("fast_path", True))
        trainer = super().instantiate_trainer(callbacks=[*given, *ours, self.fast_path], **kwargs)
        # the fast path may skip idle hooks of every callback but the user's (the CLI's, Lightning's defaults)
        self.fast_path.callbacks = [cb for cb in trainer.callbacks if not any(cb is u for u in users)]
        return trainer

    @override
    def after_fit(self) -> None:
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
