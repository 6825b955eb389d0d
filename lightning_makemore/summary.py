"""What `train.py fit` prints about a run: the network's layers when fit starts (`LayerSummary`, a callback), and
when it ends the losses, the steps, where the checkpoints and logs are, and names sampled from the trained model
(`print_fit_summary`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parameter import UninitializedParameter
from torchmetrics import Metric
from typing_extensions import override

from lightning_makemore.data import NamesDataModule
from lightning_makemore.module import MakemoreModule, split_loss


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


@rank_zero_only
def print_fit_summary(
    trainer: L.Trainer, dm: NamesDataModule, model: MakemoreModule, seconds: float, log_dir: str | None
) -> None:
    """Prints, on rank zero, the end of a fit: the losses on the whole splits, the steps and their time, where the
    checkpoints and logs are (and the TensorBoard command), then `dm.num_samples` names sampled from `model`."""
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


def _rel(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it is inside it (shorter to read and to copy)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
