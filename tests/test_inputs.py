"""The first layer's inputs: their scale read on the first recorded steps, and the unnormalised-inputs judge."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from callbacks import HealthMonitor, Monitor
from callbacks._cadence import Cadence
from callbacks.judges.base import Action, Judge
from callbacks.judges.base import Readouts as Readings
from callbacks.judges.data import MAX_INPUT_RMS, UnnormalisedInputs
from callbacks.probes.inputs import CHECKED_STEPS, InputProbe, Inputs

BATCH = 16


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embedding_free = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.embedding_free(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Keep(Judge):
    reads = (Inputs,)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Inputs] = []

    def observe(self, step, readouts):
        self.seen.append(readouts[Inputs])
        return []


def data(scale: float, shift: float):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * BATCH, 4, generator=g) * scale + shift
    y = torch.randint(0, 3, (8 * BATCH,), generator=g)
    return x, y


def fit(tmp_path, callbacks, x, y, steps=6, model=None):
    trainer = L.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path), callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model or Net(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH))


def test_the_first_layers_input_is_read_on_the_first_recorded_steps(tmp_path):
    keep = Keep()
    x, y = data(50.0, 20.0)
    fit(tmp_path, [Monitor(InputProbe(Cadence(every_n_steps=1)), [keep], warn=False)], x, y)
    # recorded: steps 0, 1, 2, ... ; read: the first three, the batches 0, 1, 2 in order (no shuffling)
    assert [r.step for r in keep.seen] == list(range(CHECKED_STEPS))
    for r, i in zip(keep.seen, range(CHECKED_STEPS), strict=True):
        batch = x[i * BATCH : (i + 1) * BATCH].double()
        assert r.layer == "embedding_free.0 (Linear)" and r.elements == batch.numel()
        assert r.mean == pytest.approx(batch.mean().item()) and r.rms == pytest.approx(
            batch.square().mean().sqrt().item()
        )


@pytest.mark.parametrize(("scale", "shift", "found"), [(50.0, 20.0, True), (1.0, 0.0, False), (0.3, 0.5, False)])
def test_unnormalised_inputs_are_a_problem_with_a_normalise_inputs_action(tmp_path, scale, shift, found):
    monitor = HealthMonitor(report=False, warn=False)
    fit(tmp_path, [monitor], *data(scale, shift))
    hits = [f for f in monitor.findings if f.key == "data/inputs"]
    if not found:
        assert hits == []
        return
    (f,) = hits
    assert f.severity == "problem" and f.where == "embedding_free.0 (Linear)" and "Standardise the inputs" in f.fix
    assert f.action == Action("normalise_inputs", ("embedding_free.0",), None, f.action.evidence)


def test_the_inputs_judge_by_hand():
    def judged(mean: float, rms: float) -> list:
        return UnnormalisedInputs().observe(0, Readings.of(Inputs(0, "fc (Linear)", 100, mean, rms)))

    (f,) = judged(20.0, math.hypot(20.0, 50.0))  # the fault zoo's operator: x * 50 + 20
    assert "mean 20 and std 50" in f.message and "~54x" in f.message
    assert judged(0.0, MAX_INPUT_RMS) == []  # at the limit: not above it
    assert judged(127.0, 150.0) != []  # raw pixels


class Embedded(L.LightningModule):
    """Indices in, an embedding first: its Linear is given learnt features (huge here), not the data."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.embedding.weight.mul_(100)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.embedding(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_model_that_starts_with_an_embedding_is_not_judged_on_its_inputs(tmp_path):
    monitor = HealthMonitor(report=False, warn=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (4 * BATCH,), generator=g), torch.randint(0, 3, (4 * BATCH,), generator=g)
    fit(tmp_path, [monitor], x, y, steps=4, model=Embedded())
    assert [f for f in monitor.findings if f.key == "data/inputs"] == []
