"""callbacks.fixes: each generic action applied to a tiny model and undone, checked against plain PyTorch."""

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.fixes import ApplyFixes, actions_of, applicable, apply_actions
from callbacks.judges.base import Action, Finding


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 256), nn.Tanh(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_scale_lr_of_the_model_follows_the_scheduler_and_is_undone():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    applied = apply_actions(net, [Action("scale_lr", (), 0.3)], [opt], [sched])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03)
    opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * 0.5)  # the schedule goes on from the new lr
    applied.undo()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and sched.base_lrs == [0.1]


def test_scale_lr_of_named_parameters_splits_their_group():
    net = _net()
    before = _state(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    applied = apply_actions(net, [Action("scale_lr", ("4.weight", "4.bias"), 0.01)], [opt], [sched])
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2] and sched.base_lrs == [0.1, pytest.approx(1e-3)]
    x = torch.randn(8, 4)
    net(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    opt.step()
    sched.step()
    for name, p in net.named_parameters():  # plain SGD by hand: w - lr * grad, the lr of its group
        lr = 1e-3 if name.startswith("4.") else 0.1
        torch.testing.assert_close(p.detach(), before[name] - lr * grads[name])
    applied.undo()
    assert [len(g["params"]) for g in opt.param_groups] == [6] and opt.param_groups[0]["lr"] == 0.1
    assert sched.base_lrs == [0.1] and len(sched.lr_lambdas) == 1


def test_scale_layer_and_undo():
    net = _net()
    before = _state(net)
    applied = apply_actions(net, [Action("scale_layer", ("4",), 0.01)])
    torch.testing.assert_close(net[4].weight.detach(), before["4.weight"] * 0.01)
    torch.testing.assert_close(net[4].bias.detach(), before["4.bias"] * 0.01)
    torch.testing.assert_close(net[2].weight.detach(), before["2.weight"])  # the others untouched
    applied.undo()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_init_reinitialises_the_layer_feeding_an_activation_at_its_gain():
    net = _net()
    before = _state(net)
    with torch.no_grad():
        net[2].weight.mul_(10)  # a layer initialised too large
    applied = apply_actions(net, [Action("init", ("3",), "kaiming")])  # the ReLU: net[2] feeds it
    std = net[2].weight.std().item()
    assert std == pytest.approx(math.sqrt(2) / math.sqrt(256), rel=0.02) and net[2].bias.abs().max() == 0
    torch.testing.assert_close(net[0].weight.detach(), before["0.weight"])
    applied.undo()
    torch.testing.assert_close(net[2].weight.detach(), before["2.weight"] * 10)


def test_init_of_the_whole_model_leaves_the_output_layer():
    net = _net()
    before = _state(net)
    apply_actions(net, [Action("init", (), "kaiming")])
    assert net[0].weight.std().item() == pytest.approx(5 / 3 / 2, rel=0.05)  # tanh's gain over sqrt(4)
    assert net[2].weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.02)  # ReLU's
    torch.testing.assert_close(net[4].weight.detach(), before["4.weight"])


def test_init_before_a_normalisation_restores_the_layers_own_default():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3))
    with torch.no_grad():
        net[0].weight.zero_()  # the fault zoo's "zeros": every ReLU after the BatchNorm dead
    before = _state(net)
    applied = apply_actions(net, [Action("init", ("2",), "kaiming")], seed=7)
    # PyTorch's own default (kaiming_uniform with a = sqrt(5): bound 1 / sqrt(fan_in)) drawn from the seed the
    # action takes from its generator: the same numbers
    g = torch.Generator().manual_seed(7)
    twin = nn.Conv2d(1, 8, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        twin.reset_parameters()
    torch.testing.assert_close(net[0].weight.detach(), twin.weight.detach())
    torch.testing.assert_close(net[0].bias.detach(), twin.bias.detach())
    assert net[0].weight.abs().max() <= 1 / 3 and net[0].weight.std() < math.sqrt(2) / 3 / 2  # not Kaiming's
    # the whole model's init: the conv (BatchNorm after it) by its default, the output layer left alone
    apply_actions(net, [Action("init", (), "kaiming")], seed=7)
    torch.testing.assert_close(net[0].weight.detach(), twin.weight.detach())
    torch.testing.assert_close(net[4].weight.detach(), before["4.weight"])
    applied.undo()
    torch.testing.assert_close(net[0].weight.detach(), before["0.weight"])


class _Tiny(pl.LightningModule):
    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.net, self.lr = _net(), lr
        self.grad_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) * 100, y)  # huge logits: large gradients

    def on_before_optimizer_step(self, optimizer):
        self.before = {n: p.detach().clone() for n, p in self.named_parameters()}

    def on_train_batch_end(self, outputs, batch, batch_idx):
        update = torch.cat([(p.detach() - self.before[n]).flatten() for n, p in self.named_parameters()])
        self.grad_norms.append(update.norm().item() / self.lr)  # SGD: update = lr * (clipped) gradient

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}


def _fit(callbacks: list) -> tuple[pl.Trainer, _Tiny]:
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16)
    model = _Tiny()
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)  # fmt: skip
    trainer.fit(model, loader)
    return trainer, model


def test_apply_fixes_clips_the_gradients_in_a_fit():
    _, plain = _fit([])
    assert max(plain.grad_norms) > 1.5  # without the fix the gradients are large
    fixes = ApplyFixes([Action("clip_gradients", (), 1.0)])
    trainer, model = _fit([fixes])
    assert trainer.gradient_clip_val == 1.0 and max(model.grad_norms) == pytest.approx(1.0, rel=1e-4)
    fixes.applied.undo()
    assert trainer.gradient_clip_val is None


def test_apply_fixes_scales_a_named_parameters_lr_in_a_fit():
    fixes = ApplyFixes([Action("scale_lr", ("net.4.weight",), 0.1)])
    trainer, _ = _fit([fixes])
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [1.0, pytest.approx(0.1)]


def test_actions_of_findings_and_bad_input():
    scale = Action("scale_lr", (), 0.1, "first")
    findings = [
        Finding("a", 0, "", "m", action=scale),
        Finding("b", 5, "", "m", action=Action("scale_lr", (), 0.3, "second")),  # same kind and targets: once
        Finding("c", 0, "", "m", severity="note", action=Action("clip_gradients", (), 1.0)),  # a note: none
        Finding("d", 0, "", "m", action=Action("normalise")),
    ]
    assert actions_of(findings) == [scale, Action("normalise")]
    assert applicable(actions_of(findings)) == [scale]
    # the learning rate asked twice: the larger move when both go the same way (a spike's x 0.3 during the fit,
    # then the end-of-fit advice's x 0.1), the later one when they disagree
    spike, advice = Action("scale_lr", (), 0.3, "spike"), Action("scale_lr", (), 0.1, "advice")
    up = Action("scale_lr", (), 10.0, "slow")
    assert actions_of([Finding("s", 5, "", "m", action=spike), Finding("l", 9, "", "m", action=advice)]) == [advice]
    assert actions_of([Finding("l", 9, "", "m", action=advice), Finding("s", 5, "", "m", action=spike)]) == [advice]
    assert actions_of([Finding("s", 5, "", "m", action=spike), Finding("l", 9, "", "m", action=up)]) == [up]
    named = Action("scale_lr", ("head.weight",), 0.1)  # other parameters: its own action
    assert actions_of([Finding("s", 5, "", "m", action=spike), Finding("n", 9, "", "m", action=named)]) == [
        spike,
        named,
    ]
    with pytest.raises(ValueError, match="rebuild the model"):
        apply_actions(_net(), [Action("normalise")])
    with pytest.raises(ValueError, match="Expected a module name of the model, but got 'nope'"):
        apply_actions(_net(), [Action("scale_layer", ("nope",), 0.1)])
    with pytest.raises(ValueError, match="needs the optimizers"):
        apply_actions(_net(), [Action("scale_lr", (), 0.1)])
    with pytest.raises(ValueError, match="Expected generic actions"):
        ApplyFixes([Action("activation", (), None, "relu")])
