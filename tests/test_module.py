"""The LightningModule: same weights as a plain PyTorch loop, exact split losses, sampling, checkpoints."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_makemore import MakemoreModule, NamesDataModule, split_loss
from lightning_makemore.data import TrainBatches


def model_for(dm: NamesDataModule, **kwargs) -> MakemoreModule:
    """The module built for `dm`'s vocabulary and context, as the CLI links them."""
    return MakemoreModule(vocab=list(dm.vocab.itos), block_size=dm.block_size, **kwargs)


def _trainer(tmp_path, max_steps, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=max_steps,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    return L.Trainer(**(defaults | kwargs))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lightning_steps_match_a_plain_pytorch_loop(small_corpus, tmp_path, optimizer):
    """Same init, same batches, same schedule: Lightning's weights equal those of the lecture-style loop."""
    steps = 40
    dm = NamesDataModule(path=str(small_corpus), batch_size=32)
    model = model_for(dm, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 3e-3, lr_decay_at=0.5)
    dm.setup("fit")
    # a copy of the initial net for the reference loop
    reference = copy.deepcopy(model.net)
    _trainer(tmp_path, steps, limit_val_batches=0).fit(model, datamodule=dm)

    X, Y = dm.splits["train"]
    params = list(reference.parameters())
    if optimizer == "adamw":
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}],
            lr=3e-3,
            betas=(0.9, 0.99),
        )
    for i, (xb, yb) in enumerate(TrainBatches(X, Y, 32, dm.seed, "random")):
        if i == steps:
            break
        loss = F.cross_entropy(reference(xb), yb)
        for p in params:
            p.grad = None
        loss.backward()
        if optimizer == "sgd":
            lr = 0.1 if i < steps // 2 else 0.01  # the lecture's step decay at half the steps
            with torch.no_grad():
                for p in params:
                    p += -lr * p.grad
        else:
            for group in opt.param_groups:
                group["lr"] = 3e-3 if i < steps // 2 else 3e-4
            opt.step()
    for (name, a), b in zip(model.net.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_val_and_test_loss_are_exact_over_the_whole_split(names_path, tmp_path):
    dm = NamesDataModule(path=str(names_path), eval_batch_size=1000)  # 22,655 = 22 full batches + 655
    model = model_for(dm)
    trainer = _trainer(tmp_path, 30)
    trainer.fit(model, datamodule=dm)
    X, Y = dm.splits["val"]
    with torch.no_grad():
        model.net.eval()
        expected = F.cross_entropy(model.net(X), Y).item()  # one pass over all 22,655 examples
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(expected, abs=5e-6)
    assert split_loss(model.net, X, Y) == pytest.approx(expected, abs=5e-6)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    Xt, Yt = dm.splits["test"]
    assert result["test/loss"] == pytest.approx(split_loss(model.net, Xt, Yt), abs=5e-6)


def test_sampling_is_seeded_and_stops_at_the_end_token(small_corpus, tmp_path):
    dm = NamesDataModule(path=str(small_corpus))
    model = model_for(dm)
    _trainer(tmp_path, 200).fit(model, datamodule=dm)
    a, b, c = model.sample(10, seed=1), model.sample(10, seed=1), model.sample(10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert all("." not in n and set(n) <= set("abcdefghijklmnopqrstuvwxyz") for n in a)
    assert model.training  # sampling restores the mode it found


def test_sampling_with_a_rigged_network():
    model = MakemoreModule(vocab=[".", "a", "b"], block_size=2, batchnorm=False)
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.bias.copy_(torch.tensor([-1e4, 1e4, -1e4]))  # always 'a', never the end token
        assert model.sample(3, max_len=5) == ["aaaaa"] * 3
        model.net.head.bias.copy_(torch.tensor([1e4, -1e4, -1e4]))  # the end token at once
        assert model.sample(2) == ["", ""]


def test_checkpoint_rebuilds_the_model_without_data(small_corpus, tmp_path):
    dm = NamesDataModule(path=str(small_corpus), block_size=4)
    model = model_for(dm, n_hidden=32)
    trainer = _trainer(tmp_path, 20, enable_checkpointing=True)
    trainer.fit(model, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MakemoreModule.load_from_checkpoint(path, map_location="cpu")
    assert loaded.hparams.block_size == 4 and len(loaded.hparams.vocab) == 27
    assert loaded.sample(5, seed=3) == model.sample(5, seed=3)


@pytest.mark.parametrize(
    ("schedule", "at_steps"),
    [
        ("step", {0: 1.0, 49: 1.0, 50: 0.1, 99: 0.1}),
        ("cosine", {0: 1.0, 50: 0.55, 100: 0.1}),
        ("onecycle", {0: 0.04, 10: 1.0, 100: 1e-4}),
    ],
)
def test_schedules(schedule, at_steps):
    from lightning_makemore.module import _schedule

    f = _schedule(schedule, total=100, decay_at=0.5, decay_factor=0.1, warmup=0.1)
    for step, expected in at_steps.items():
        assert f(step) == pytest.approx(expected, abs=1e-9), (schedule, step)


def test_batch_size_one_with_batchnorm_is_refused(small_corpus, tmp_path):
    dm = NamesDataModule(path=str(small_corpus), batch_size=1)
    with pytest.raises(ValueError, match=r"Expected --data\.batch_size >= 2 with BatchNorm, but got 1"):
        _trainer(tmp_path, 5).fit(model_for(dm), datamodule=dm)
    # without BatchNorm a batch of one is fine
    _trainer(tmp_path, 5, limit_val_batches=0).fit(model_for(dm, batchnorm=False), datamodule=dm)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "Expected optimizer 'sgd' or 'adamw', but got 'adam'"),
        ({"schedule": "linear"}, "Expected schedule to be one of step, constant, cosine, onecycle"),
        ({"lr": 0.0}, "Expected lr > 0"),
        ({"vocab": ["a", "b"], "block_size": 3}, "Expected vocab to start with '.'"),
        ({"n_hidden": 0}, "Expected n_hidden to be an integer >= 1, but got 0"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MakemoreModule(**kwargs)


def test_weight_averaging_callbacks_see_the_built_net(small_corpus, tmp_path):
    """EMAWeightAveraging copies the model in its own setup, before the module's: the net must exist then."""
    try:
        from lightning.pytorch.callbacks import EMAWeightAveraging
    except ImportError:
        pytest.skip("EMAWeightAveraging needs Lightning >= 2.6")
    ema = EMAWeightAveraging(decay=0.9)
    dm = NamesDataModule(path=str(small_corpus))
    model = model_for(dm)
    _trainer(tmp_path, 20, callbacks=[ema], limit_val_batches=0).fit(model, datamodule=dm)
    averaged = dict(ema._average_model.module.named_parameters())
    assert set(averaged) == {f"net.{n}" for n, _ in model.net.named_parameters()}


def test_zero_grad_is_the_lectures_or_the_optimizers_own():
    """`optimizer_zero_grad` leaves every stepped parameter's grad None (as `zero_grad()` does); an optimizer that
    defines its own `zero_grad` gets it called instead."""

    class Zeroing(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            Zeroing.calls += 1
            super().zero_grad(set_to_none=False)

    model = MakemoreModule(vocab=list(".abc"), block_size=3, schedule="constant")
    x, y = torch.tensor([[0, 1, 2], [3, 2, 1]]), torch.tensor([1, 0])
    for optimizer in (model.configure_optimizers(), Zeroing(model.parameters(), lr=0.1)):
        model.train()
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in model.parameters())
        model.optimizer_zero_grad(0, 0, optimizer)
        if isinstance(optimizer, Zeroing):
            assert Zeroing.calls == 1
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        else:
            assert all(p.grad is None for p in model.parameters())
