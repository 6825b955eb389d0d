"""The per-step shortcuts (fastpath.py, the monitors' sleep): hooks that do nothing are skipped, and nothing a user
overrides or configures is lost."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import ActivationMonitor, CallbackGroup, GradientMonitor, ParameterMonitor, UpdateRatioMonitor
from lightning_makemore import MakemoreModule, NamesDataModule
from lightning_makemore.cli import MakemoreCLI
from lightning_makemore.fastpath import FastPath
from tests.callbacks_helpers import TanhMLP, fixed_loader, histograms, read_events, saturating_batch, scalars, trainer
from tests.test_module import _trainer

MODULE_HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_zero_grad")


class HookProbe(Callback):
    """Records, during training, which module hooks are shadowed and the gradient norm the optimizer steps with."""

    def __init__(self) -> None:
        self.shadowed: set[str] = set()
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(self._record_norm)  # grads of the step just taken

    def _record_norm(self, optimizer: torch.optim.Optimizer, *args) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hooks = {hook for hook, value in vars(pl_module).items() if value is None}
        self.shadowed |= {hook for hook in hooks if hook.startswith(("on_", "configure_"))}


class CountingModule(MakemoreModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backward_calls = 0

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.backward_calls += 1


def _fit(corpus, tmp_path, model, steps=6, datamodule=None, **kwargs) -> HookProbe:
    probe = HookProbe()
    dm = datamodule or NamesDataModule(path=str(corpus), batch_size=32)
    trainer = _trainer(tmp_path, steps, limit_val_batches=0, callbacks=[FastPath(), probe], **kwargs)
    trainer.fit(model, datamodule=dm)
    return probe


def _model(corpus, cls=MakemoreModule, **kwargs) -> MakemoreModule:
    dm = NamesDataModule(path=str(corpus))
    return cls(vocab=list(dm.vocab.itos), block_size=dm.block_size, **kwargs)


def test_module_skips_its_empty_hooks_during_fit_only(small_corpus, tmp_path):
    model = _model(small_corpus)
    probe = _fit(small_corpus, tmp_path, model)
    assert set(MODULE_HOOKS) | {"configure_gradient_clipping"} <= probe.shadowed
    assert not any(vars(model).get(hook, 0) is None for hook in probe.shadowed)  # restored after fit
    assert callable(model.on_before_backward) and callable(model.configure_gradient_clipping)


def test_overridden_hooks_and_gradient_clipping_still_run(small_corpus, tmp_path):
    model = _model(small_corpus, CountingModule, lr=10.0)  # a large lr: the gradients would be far above the clip
    probe = _fit(small_corpus, tmp_path, model, steps=5, gradient_clip_val=0.01)
    assert model.backward_calls == 5
    assert "on_before_backward" not in probe.shadowed and "configure_gradient_clipping" not in probe.shadowed
    assert len(probe.norms) == 5 and max(probe.norms) <= 0.01 * (1 + 1e-4)
    unclipped = _fit(small_corpus, tmp_path, _model(small_corpus, lr=10.0), steps=5)
    assert min(unclipped.norms) > 0.1  # without clipping the same run has large gradients


class StepCounter(Callback):
    def __init__(self) -> None:
        self.ends = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends += 1
        # the CLI's checkpoint callbacks: their empty hooks are shadowed while training, and their per-step
        # hook too (they save after validation only); this user callback is left as it is
        for ckpt in (cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)):
            assert vars(ckpt).get("on_before_backward", 0) is None and vars(ckpt).get("on_train_batch_end", 0) is None
        assert not any(value is None for value in vars(self).values())


def test_cli_skips_empty_callback_hooks_and_restores_them(small_corpus, tmp_path):
    counter = StepCounter()
    cli = MakemoreCLI(
        MakemoreModule,
        NamesDataModule,
        args=[
            "fit",
            "--trainer.max_steps=7",
            "--monitors=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.path={small_corpus}",
        ],
        trainer_defaults={"callbacks": [counter]},
        save_config_kwargs={"overwrite": True},
    )
    assert counter.ends == 7
    for cb in cli.trainer.callbacks:  # everything restored after fit
        assert not [hook for hook, value in vars(cb).items() if hook.startswith("on_") and value is None]
    best, last = (cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint))
    assert best.best_model_path.endswith(".ckpt") and last.best_model_path.endswith("last.ckpt")  # still saved


def test_group_sleeps_between_its_monitors_recorded_steps(tmp_path, monkeypatch):
    """The group's step hooks (and so its monitors') run only on recorded steps; no forward hook stays between."""
    import callbacks._recorder as recorder_module

    monitor = ActivationMonitor(every_n_steps=5, histogram_every_n_steps=10)
    group = CallbackGroup([monitor])
    awake, hooked, read = [], [], []

    def logging_step(trainer, pl_module):
        read.append(trainer.global_step)
        return trainer.global_step

    monkeypatch.setattr(recorder_module, "logging_step", logging_step)

    class Probe(Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if vars(group).get("on_train_batch_end", "awake") is not None:
                awake.append(trainer.global_step)
            if pl_module.act._forward_hooks:
                hooked.append(trainer.global_step)

    t = trainer(tmp_path, [group, Probe()], max_steps=23, log_every_n_steps=5)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 23))
    acc = read_events(t.logger.log_dir)
    assert set(scalars(acc, "activation/act/mean")) == {0, 4, 9, 14, 19}
    assert set(histograms(acc, "activation/act")) == {0, 9, 19, 22}  # and at the final step
    # step 0 (the picture at initialisation), the logged steps, and the final step
    assert awake == hooked == [0, 4, 9, 14, 19, 22]
    assert not t.lightning_module.act._forward_hooks
    # asleep, the batches that cannot reach the next recorded step pass without a look at the step: it is read on
    # each recorded step and on the step after it (which counts the batches to let pass), nowhere else
    assert read == [0, 1, 4, 5, 9, 10, 14, 15, 19, 20, 22]


def test_parameter_scalars_without_histograms_count_nan_gradients(tmp_path):
    """Steps without histograms use two stds a parameter; with NaN among the gradients they fall back to the
    full statistics, which count the non-finite entries and leave them out."""
    grads = {}

    class InjectNaN(Callback):  # two NaN in the gradient after backward, seen by the monitor
        def on_after_backward(self, trainer, pl_module) -> None:
            grad = pl_module.hidden.weight.grad
            grad[0, 0] = grad[1, 2] = float("nan")
            grads[trainer.global_step] = grad.detach().clone()

    class CleanUp(Callback):  # called after the monitor: the step itself sees finite gradients
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            pl_module.hidden.weight.grad.nan_to_num_(0.0)

    monitor = ParameterMonitor(every_n_steps=1, histogram_every_n_steps=0)
    t = trainer(tmp_path, [InjectNaN(), monitor, CleanUp()], max_steps=3)
    with pytest.warns(UserWarning, match="non-finite"):
        t.fit(TanhMLP(), fixed_loader(saturating_batch(16), 3))
    acc = read_events(t.logger.log_dir)
    assert not acc.Tags()["histograms"]
    assert set(grads) == {0, 1, 2}
    for step, grad in grads.items():
        finite = grad[torch.isfinite(grad)]
        assert scalars(acc, "param_grad/hidden.weight/nonfinite")[step] == 2
        assert scalars(acc, "param_grad/hidden.weight/std")[step] == pytest.approx(finite.std().item(), rel=1e-5)
    head = scalars(acc, "param_grad/head.weight/grad_to_data")
    assert len(head) == 3 and all(math.isfinite(v) for v in head.values())


@pytest.mark.parametrize("accumulate", [1, 3])
def test_all_monitors_in_a_group_log_the_same_as_each_alone_with_sparse_cadence(tmp_path, accumulate):
    """Histograms every 4 steps, scalars every 2, 11 steps: the grouped run skips most hook calls."""

    def members():
        return [
            ActivationMonitor(every_n_steps=2, histogram_every_n_steps=4),
            GradientMonitor(every_n_steps=2, histogram_every_n_steps=4),
            ParameterMonitor(every_n_steps=2, histogram_every_n_steps=4),
            UpdateRatioMonitor(every_n_steps=2),
        ]

    logs = {}
    for grouped in (False, True):
        cbs = [CallbackGroup(members())] if grouped else members()
        t = trainer(tmp_path / str(grouped), cbs, max_steps=11, log_every_n_steps=2, accumulate_grad_batches=accumulate)
        torch.manual_seed(0)  # the same initial weights in both runs
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 11 * accumulate))
        acc = read_events(t.logger.log_dir)
        tags = acc.Tags()
        logs[grouped] = {tag: scalars(acc, tag) for tag in tags["scalars"]}, sorted(tags["histograms"])
    assert logs[True][1] == logs[False][1]
    assert logs[True][0].keys() == logs[False][0].keys()
    for tag, values in logs[False][0].items():
        assert set(values) == set(logs[True][0][tag]), tag
        assert list(values.values()) == pytest.approx(list(logs[True][0][tag].values()), rel=1e-6), tag
    assert set(logs[True][0]["activation/act/mean"]) == {0, 1, 3, 5, 7, 9}


class ReversingDataModule(NamesDataModule):
    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        self.seen = getattr(self, "seen", 0) + 1
        return x.flip(1), y  # the context read backwards


def test_batch_hooks_overridden_in_the_module_or_data_module_are_called(small_corpus, tmp_path):
    class Recording(MakemoreModule):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            self.before = getattr(self, "before", 0) + 1
            return batch

        def training_step(self, batch, batch_idx):
            self.first_x = getattr(self, "first_x", batch[0])
            return super().training_step(batch, batch_idx)

    dm = ReversingDataModule(path=str(small_corpus), batch_size=32)
    model = Recording(vocab=list(dm.vocab.itos), block_size=dm.block_size)
    _fit(small_corpus, tmp_path, model, steps=3, datamodule=dm)
    assert model.before == 3 and dm.seen == 3
    first = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(model.first_x, first.flip(1))


def test_a_monitor_alone_sleeps_between_its_logged_steps(tmp_path):
    monitor = ActivationMonitor(every_n_steps=5, histogram_every_n_steps=10)
    asleep: dict[int, bool] = {}

    class Probe(Callback):
        def on_before_backward(self, trainer, pl_module, loss) -> None:
            asleep[trainer.global_step] = vars(monitor).get("on_train_batch_end", "awake") is None

    t = trainer(tmp_path, [monitor, Probe()], max_steps=12, log_every_n_steps=5)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 12))
    assert [step for step, value in asleep.items() if not value] == [0, 4, 9, 11]  # 11: the final histogram
    assert set(scalars(read_events(t.logger.log_dir), "activation/act/mean")) == {0, 4, 9}
    assert callable(monitor.on_train_batch_end) and "on_train_batch_end" not in vars(monitor)  # awake after fit


@pytest.mark.parametrize(
    "every", ["--trainer.val_check_interval=10", "--trainer.limit_train_batches=10"], ids=["mid_epoch", "epoch_end"]
)
def test_last_checkpoint_holds_the_last_step_even_when_val_did_not_improve(small_corpus, tmp_path, every):
    """Validation every 10 steps, either inside an epoch or at the end of 10-step epochs (where Lightning saves)."""
    args = [
        "fit",
        "--trainer.max_steps=30",
        every,
        "--trainer.limit_val_batches=1",
        "--model.lr=1e-30",  # the weights stay put: the later validations do not improve on the first
        "--model.batchnorm=false",
        "--monitors=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.path={small_corpus}",
    ]
    cli = MakemoreCLI(MakemoreModule, NamesDataModule, args=args, save_config_kwargs={"overwrite": True})
    best, latest = (cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint))
    assert "step10-" in best.best_model_path  # the best is the first validation ...
    assert latest.best_model_path.endswith("last.ckpt")
    last = torch.load(latest.best_model_path, map_location="cpu", weights_only=False)
    assert last["global_step"] == 30  # ... and last.ckpt the weights of the last step
    torch.testing.assert_close(last["state_dict"]["net.head.weight"], cli.model.net.head.weight.detach())
