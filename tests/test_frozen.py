"""A layer frozen by mistake: found at step 0 of a fit from scratch (a note when fine-tuning), and unfrozen."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from callbacks import HealthMonitor
from callbacks.fixes import ApplyFixes, apply_actions
from callbacks.judges.base import Action, Readouts
from callbacks.judges.frozen import FrozenLayers
from callbacks.probes.frozen import FrozenModules
from callbacks.probes.loss import Loss


class Net(L.LightningModule):
    def __init__(self, filtered: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        self.net[2].requires_grad_(False)  # the hidden layer frozen by mistake
        self.filtered = filtered

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad] if self.filtered else self.parameters()
        return torch.optim.SGD(params, lr=0.1)


def fit(tmp_path, model, callbacks, steps=5):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    trainer = L.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path), callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    return trainer


def test_a_layer_frozen_in_a_fit_from_scratch_is_a_problem_with_an_unfreeze_action(tmp_path):
    monitor = HealthMonitor(report=False, warn=False)
    fit(tmp_path, Net(), [monitor])
    (f,) = [f for f in monitor.findings if f.key == "frozen/layers"]
    assert f.severity == "problem" and f.where == "net.2" and "`net.2` is frozen" in f.message
    assert f.action == Action("unfreeze", ("net.2",), None, f.action.evidence)


def test_the_judge_by_hand_fresh_or_fine_tuned():
    frozen = FrozenModules(0, ["encoder.0", "encoder.2"], 4)
    (f,) = FrozenLayers().observe(0, Readouts.of(frozen, Loss(0, 1.1, 3, "given")))  # ln 3 = 1.10: fresh
    assert f.severity == "problem" and "are frozen" in f.message and f.action.targets == ("encoder.0", "encoder.2")
    (f,) = FrozenLayers().observe(0, Readouts.of(frozen, Loss(0, 0.3, 3, "given")))  # far below ln 3: pretrained
    assert f.severity == "note" and f.action is None
    (f,) = FrozenLayers().observe(0, Readouts.of(frozen))  # no loss: a note
    assert f.severity == "note"
    (f,) = FrozenLayers().observe(40, Readouts.of(frozen, Loss(40, 1.1, 3, "given")))  # a resumed fit: not step 0
    assert f.severity == "note"


@pytest.mark.parametrize("filtered", [False, True])
def test_unfreeze_trains_the_layer_and_is_undone(tmp_path, filtered):
    """Unfrozen when training starts, the layer moves by SGD's own update (checked by hand on one step); an
    optimizer built from the trainable parameters only gets a group for it."""
    model = Net(filtered)
    before = model.net[2].weight.detach().clone()
    trainer = fit(tmp_path, model, [ApplyFixes([Action("unfreeze", ("net.2",))])], steps=3)
    assert model.net[2].weight.requires_grad and not torch.equal(model.net[2].weight.detach(), before)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == (2 if filtered else 1) and all(g["lr"] == 0.1 for g in groups)
    # by hand, on a fresh twin: one step of SGD with the layer unfrozen
    net = Net(filtered).net
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad] if filtered else net.parameters(), lr=0.1)
    applied = apply_actions(net, [Action("unfreeze", ("2",))], [opt])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    w = net[2].weight.detach().clone()
    F.cross_entropy(net(x), y).backward()
    grad = net[2].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net[2].weight.detach(), w - 0.1 * grad)
    applied.undo()
    assert not net[2].weight.requires_grad and len(opt.param_groups) == 1
    assert math.isclose(opt.param_groups[0]["lr"], 0.1)
