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

import difflib
import inspect
import logging
import os
import re
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
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parameter import UninitializedParameter
from torchmetrics import Metric
from typing_extensions import override

from lightning_makemore.data import DataError, NamesDataModule
from lightning_makemore.fastpath import FastPath
from lightning_makemore.model import net_settings
from lightning_makemore.module import MakemoreModule, check_batch_size, split_loss
from lightning_makemore.progress import StepProgressBar

PROGRESS_BAR_REFRESH = 50  # steps between progress-bar refreshes (Lightning's default, 1, is a cost per step)


class UsageError(ValueError):
    """A command-line mistake; the message is one line naming the flag, the allowed values and the fix."""


class NothingToTrain(Exception):
    """`fit --ckpt_path` from a checkpoint that already reached `max_steps`: nothing is wrong, and nothing to do.
    The message is one line with the numbers and what to run instead."""


def _check_something_to_train(ckpt_path: str, max_steps: int | None) -> None:
    """Raises `NothingToTrain` when the checkpoint's step is already `max_steps` or more (Lightning would open a
    new run folder and stop at once, with a train loss and no validation)."""
    if not max_steps or max_steps <= 0:
        return
    try:
        step = torch.load(ckpt_path, map_location="cpu", weights_only=False).get("global_step")
    except Exception:  # not a checkpoint: Lightning says why when it loads it
        return
    if not isinstance(step, int) or step < max_steps:
        return
    where = "already at" if step == max_steps else "past"
    raise NothingToTrain(
        f"Nothing to train: {ckpt_path} is at step {step:,}, {where} --trainer.max_steps {max_steps:,}. "
        f"Pass a larger --trainer.max_steps to train on, `python train.py test --ckpt_path {ckpt_path}` to "
        f"evaluate it, or `python train.py predict --ckpt_path {ckpt_path}` to sample names."
    )


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def make_monitors(spikes: bool = False) -> list[Callback]:
    """The training-health monitors of the `callbacks` package as one callback, at their default cadence: the four
    monitors, the lecture's diagnoses and the health report (`health.md`); `spikes`: trace every step too."""
    from callbacks import HealthMonitor

    return [HealthMonitor(trace=spikes)]


class LayerSummary(ModelSummary):
    """The model summary printed when fit starts: the network's layers, their parameters, the total.

    One row per layer (a module without submodules, or one holding parameters of its own), named as the monitors'
    charts name it, e.g. ``net.blocks.0.linear``. Lightning's own summary also lists the metric objects
    (``val_loss``, ``test_loss``: no parameters, nothing to learn) and, without an example input, a
    ``Total FLOPs: 0`` line; both are left out here. Printed on rank zero, through Lightning's logger.
    """

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_info(self.table(pl_module))

    @staticmethod
    def table(pl_module: torch.nn.Module) -> str:
        """The summary as text: `Layer  Type  Params` rows, then the total (trainable count and size in MB)."""
        rows = [("Layer", "Type", "Params")]
        for name, module in pl_module.named_modules():
            if not name or any(isinstance(m, Metric) for m in _ancestors(pl_module, name)):
                continue
            own = list(module.parameters(recurse=False))
            if own or not any(True for _ in module.children()):
                rows.append((name, type(module).__name__, f"{sum(_numel(p) for p in own):,}"))
        params = list(pl_module.parameters())
        total = sum(_numel(p) for p in params)
        trainable = sum(_numel(p) for p in params if p.requires_grad)
        megabytes = sum(_numel(p) * p.element_size() for p in params) / 1e6
        which = "all trainable" if trainable == total else f"{trainable:,} trainable"
        rows.append(("Total", "", f"{total:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{n:<{widths[0]}}  {t:<{widths[1]}}  {p:>{widths[2]}}" for n, t, p in rows]
        lines[-1] += f"  ({which}, {megabytes:.2f} MB)"
        return "\n".join(lines)


def _ancestors(root: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """The modules on the path from `root` (excluded) to its submodule `name` (included)."""
    parts = name.split(".")
    return [root.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]


def _numel(p: torch.Tensor) -> int:
    return 0 if isinstance(p, UninitializedParameter) else p.numel()  # a lazy module's weights have no size yet


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
            raise UsageError(_explain(str(err))) from None

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
            _check_something_to_train(ckpt_path, trainer.get("max_steps"))
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
        TensorBoardLogger, without its `hp_metric = -1` placeholder chart. predict logs nothing; validate/test
        from a checkpoint write into the run that trained it (no new empty lightning_logs/version_N).
        None: the user's own choice stands."""
        if trainer_config.get("logger") not in (None, True) or trainer_config.get("barebones"):
            return None  # the user's logger, or none at all in barebones mode
        if self.subcommand == "predict":
            return False
        ckpt = Path(config.get("ckpt_path") or "")
        if self.subcommand != "fit" and ckpt.is_file() and ckpt.parent.name == "checkpoints":
            run = ckpt.resolve().parent.parent  # .../lightning_logs/version_0
            save_dir, name, version = run.parent.parent, run.parent.name, run.name
            return TensorBoardLogger(save_dir=save_dir, name=name, version=version, default_hp_metric=False)
        # where and how Lightning's own default logger (`logger=True`) writes
        root = trainer_config.get("default_root_dir") or os.getcwd()
        if "://" not in str(root):
            root = os.path.normpath(os.path.expanduser(root))
        return TensorBoardLogger(save_dir=root, version=SLURMEnvironment.job_id(), default_hp_metric=False)

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
        self._print_summary(seconds, log_dir)

    @rank_zero_only
    def _print_summary(self, seconds: float, log_dir: str | None) -> None:
        trainer, dm, model = self.trainer, self.datamodule, self.model
        lines = ["", "Done."]
        losses = []
        if dm.splits.get("train"):
            losses.append(f"train {split_loss(model.net, *dm.splits['train']):.4f}")
        if "val/loss" in trainer.callback_metrics:
            losses.append(f"val {float(trainer.callback_metrics['val/loss']):.4f}")
        if losses:
            lines.append(f"  loss        {', '.join(losses)} (whole splits, eval mode)")
        of = f" of {trainer.max_steps:,}" if trainer.max_steps > 0 else ""
        lines.append(f"  steps       {trainer.global_step:,}{of} in {seconds:.1f} s")
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            lines.append(f"  checkpoints {_rel(trainer.checkpoint_callback.dirpath)}")
        if log_dir:
            lines.append(f"  logs        {_rel(log_dir)}")
            if isinstance(trainer.logger, TensorBoardLogger):
                tensorboard = Path(sys.executable).parent / "tensorboard"
                command = _rel(tensorboard) if tensorboard.is_file() else "tensorboard"
                lines.append(f"  TensorBoard {command} --logdir {_rel(trainer.logger.root_dir)}")
        names = model.sample(dm.num_samples, seed=dm.sample_seed)
        lines.append(f"\n{len(names)} names sampled from the trained model:")
        print("\n".join([*lines, *names]))


@rank_zero_only
def _print_rank_zero(text: str) -> None:
    print(text)


def _rel(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it is inside it (shorter to read and to copy)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------
# one-line argument errors


def _known_flags() -> list[str]:
    """Every flag of the CLI (the Trainer's included), for "did you mean"."""

    def params(fn: Any) -> list[str]:
        skip = {"self", "vocab", "block_size", "net", "args", "kwargs"}
        return [name for name in inspect.signature(fn).parameters if name not in skip]

    flags = [f"--model.{n}" for n in [*params(MakemoreModule.__init__), *net_settings()]]
    flags += [f"--data.{n}" for n in params(NamesDataModule.__init__)]
    flags += [f"--trainer.{n}" for n in params(L.Trainer.__init__)]
    flags += ["--monitors", "--spikes", "--fix", "--threads", "--fast_path"]
    return [*flags, "--config", "--seed_everything", "--ckpt_path"]


#: Lightning's generic flags that this model replaces with its own
_NOT_OURS = {
    "--optimizer": "--model.optimizer adamw (or sgd) with --model.lr",
    "--lr_scheduler": "--model.schedule step|constant|cosine|onecycle",
}


def _explain(message: str) -> str:
    """jsonargparse's error (often many lines) as one line with what is allowed and the closest flag."""
    unknown = re.search(r"unrecognized arguments: (\S+)", message, re.IGNORECASE)
    if unknown:
        flag = unknown.group(1).split("=")[0]
        if flag in _NOT_OURS:
            return f"{flag} is Lightning's generic flag, which this model does not use: pass {_NOT_OURS[flag]}."
        close = difflib.get_close_matches(flag, _known_flags(), n=1, cutoff=0.6)
        hint = f": did you mean `{close[0]}`?" if close else "."
        return f"unknown flag {flag}{hint}"
    key = re.search(r'Parser key "([^"]+)"', message)
    got = re.search(r"Got value: (.*)", message)
    literal = re.search(r"Literal\[(.*?)\]", message)
    if key and literal:
        allowed = [v.strip().strip("'\"") for v in literal.group(1).split(",")]
        value = got.group(1).strip() if got else "?"
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"--{key.group(1)} {value} is not allowed{hint}: expected one of {', '.join(allowed)}."
    if key:
        expected = re.search(r"Expected a (.*?)\. Got", message)
        kind = re.sub(r"<class '(\w+)'>", r"\1", expected.group(1)) if expected else "another value"
        value = got.group(1).strip() if got else "?"
        return f"--{key.group(1)} {value} is not allowed: expected {kind}."
    return " ".join(message.split())


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
