"""A recorded step keeps no watched tensor alive (issue 20): counted, not measured in bytes.

A reference callback counts the distinct storages of live tensors shaped like a watched output (the outputs, the
gradients w.r.t. them, and any copy or alias of them that something keeps), at points of the step where autograd
has let them go in a step the monitors do not record (after backward, before the optimizer step). On a recorded
step (scalars and histograms, every monitor) the count must not exceed the unrecorded steps' by more than one;
before the pipeline rewrite the monitors held every output and every gradient until the end of the step (13 here).
"""

import gc
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from tests.callbacks_helpers import trainer

DEPTH, WIDTH, BATCH = 6, 64, 32


class Deep(L.LightningModule):
    """A stack of Linear -> Tanh, a NaN in one step's input (the NaN-aware path keeps nothing either)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(WIDTH, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == 2:
            x = x.clone()
            x[0, 0] = float("nan")
        return nn.functional.cross_entropy(self(x), y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Alive(Callback):
    """Counts the distinct storages of live tensors shaped like a watched output, (batch, WIDTH), at two points of
    each step: the outputs, the gradients w.r.t. them, and any copy or alias of them that something keeps."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, int]] = {}

    def _count(self, trainer: L.Trainer, point: str) -> None:
        gc.collect()
        storages = {
            t.untyped_storage().data_ptr()
            for t in gc.get_objects()
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (BATCH, WIDTH)
        }
        self.counts.setdefault(trainer.global_step, {})[point] = len(storages)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count(trainer, "after backward")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._count(trainer, "before optimizer step")


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6 * BATCH, WIDTH, generator=g), torch.randint(0, 3, (6 * BATCH,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def test_a_recorded_step_keeps_no_watched_tensor_alive(tmp_path):
    alive = Alive()
    monitors = [  # everything on steps 0 (initialisation), 2 (with a NaN) and 5 (the final step); nothing on 1, 3, 4
        ActivationMonitor(every_n_steps=3, histogram_every_n_steps=3),
        GradientMonitor(every_n_steps=3, histogram_every_n_steps=3),
        ParameterMonitor(every_n_steps=3, histogram_every_n_steps=3),
        UpdateRatioMonitor(every_n_steps=3),
    ]
    t = trainer(tmp_path, [CallbackGroup(monitors), alive], max_steps=6, log_every_n_steps=3)
    t.fit(Deep(), _loader())
    recorded, unrecorded = (0, 2, 5), (1, 3, 4)  # global steps at the hooks (0-based before the step's update)
    assert len(alive.counts) == 6
    baseline = max(alive.counts[s][p] for s in unrecorded for p in alive.counts[s])
    for step in recorded:
        for point, count in alive.counts[step].items():
            assert count <= baseline + 1, (step, point, count, baseline)
    # what autograd keeps on its own at these points is little (the batch): every kept output or gradient would show
    assert baseline < DEPTH
