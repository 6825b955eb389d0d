"""lightning-makemore: makemore part 3 (activations, gradients, BatchNorm) with PyTorch Lightning."""

from lightning_makemore.data import (
    DataError,
    NamesDataModule,
    Vocabulary,
    build_windows,
    read_names,
    split_names,
)
from lightning_makemore.model import MLP, kaiming_gain
from lightning_makemore.module import MakemoreModule, split_loss

__all__ = [
    "MLP",
    "DataError",
    "MakemoreModule",
    "NamesDataModule",
    "Vocabulary",
    "build_windows",
    "kaiming_gain",
    "read_names",
    "split_loss",
    "split_names",
]
