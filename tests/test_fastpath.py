"""fastpath.py: active during training on the tested Lightning versions, undone on every exit path, leaves the
user's callbacks alone, and changes no result (losses, weights) against Lightning's public path."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_makemore import fastpath
from lightning_makemore.cli import MakemoreCLI
from lightning_makemore.data import NamesDataModule
from lightning_makemore.fastpath import FastPath
from lightning_makemore.module import MakemoreModule
from tests.test_module import _trainer, model_for


class Spy(Callback):
    """Records, on each training step, what the fast path has changed (read through public Python only)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        fast = next(cb for cb in trainer.callbacks if isinstance(cb, FastPath))
        self.seen.append(
            {
                "active": fast.active,
                "class_swapped": type(pl_module) is not MakemoreModule,
                "module_hooks": _shadowed(pl_module),
                "signature": "__signature__" in vars(MakemoreModule.training_step),
                "spy_untouched": not _shadowed(self),
                # Lightning calls a callback's hook only if it is callable: the fast path's own are not
                "own_hooks_called": {h for h in fastpath.CALLBACK_STEP_HOOKS if callable(getattr(fast, h))},
            }
        )
        self.losses.append(float(outputs["loss"]))


def _shadowed(obj) -> set[str]:
    """The hooks shadowed by None on an instance."""
    return {name for name, value in vars(obj).items() if value is None and name.startswith(("on_", "configure_"))}


def _cli(corpus, tmp_path, *flags: str, callbacks=()) -> MakemoreCLI:
    args = ["fit", "--trainer.max_steps=25", "--trainer.log_every_n_steps=5", "--monitors=false"]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
    args += [f"--trainer.default_root_dir={tmp_path}", f"--data.path={corpus}", *flags]
    return MakemoreCLI(
        MakemoreModule,
        NamesDataModule,
        args=args,
        trainer_defaults={"callbacks": list(callbacks)},
        save_config_kwargs={"overwrite": True},
    )


def test_fast_path_is_active_during_training_and_undone_after(small_corpus, tmp_path):
    spy = Spy()
    cli = _cli(small_corpus, tmp_path, callbacks=[spy])
    assert fastpath.supported()  # the installed Lightning is one the tricks were tested on
    assert len(spy.seen) == 25
    first = spy.seen[0]
    assert first["active"] and first["class_swapped"] and first["signature"] and first["spy_untouched"]
    assert first["own_hooks_called"] == set()
    assert {"on_before_backward", "on_after_backward", "configure_gradient_clipping"} <= first["module_hooks"]
    # undone: class, hooks, signature, callbacks
    assert type(cli.model) is MakemoreModule and not cli.fast_path.active
    assert not _shadowed(cli.model)
    assert "__signature__" not in vars(MakemoreModule.training_step)
    assert not any(_shadowed(cb) for cb in cli.trainer.callbacks)


def test_results_are_identical_with_and_without_the_fast_path(small_corpus, tmp_path):
    runs = {}
    for enabled in (True, False):
        spy = Spy()
        cli = _cli(small_corpus, tmp_path / str(enabled), f"--fast_path={str(enabled).lower()}", callbacks=[spy])
        assert spy.seen[0]["active"] is enabled and spy.seen[0]["class_swapped"] is enabled
        runs[enabled] = spy.losses, cli.trainer.callback_metrics["val/loss"].item(), cli.model.net.state_dict()
    assert runs[True][0] == runs[False][0]  # every step's training loss, bit for bit
    assert runs[True][1] == runs[False][1]
    for (name, a), b in zip(runs[True][2].items(), runs[False][2].values(), strict=True):
        assert torch.equal(a, b), name


class SometimesLogs(L.LightningModule):
    """Logs on some training steps only (the progress bar's metric every 3rd, a dict every 5th), and in validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if batch_idx % 3 == 0:
            self.log("train/loss", loss, prog_bar=True)
        if batch_idx % 5 == 0:
            self.log_dict({"a": float(batch_idx), "b": loss * 2})
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/x", self.layer(batch[0]).mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MetricsReader(Callback):
    """What a callback reads of the logged metrics after every training step and after each validation."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def _read(self, trainer, where: str) -> None:
        numbers = [
            {k: float(v) for k, v in metrics.items()}
            for metrics in (trainer.callback_metrics, trainer.progress_bar_metrics, trainer.logged_metrics)
        ]
        self.seen.append((where, trainer.global_step, *numbers))

    def on_train_batch_end(self, trainer, *args) -> None:
        self._read(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._read(trainer, "validation")


def _sometimes_logs_fit(tmp_path, fast: FastPath, callbacks=(), epochs: int = 2) -> tuple[L.Trainer, list[dict]]:

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)  # 16 steps an epoch
    trainer = L.Trainer(
        max_epochs=epochs,
        val_check_interval=0.5,
        limit_val_batches=2,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[fast, *callbacks],
    )
    trainer.fit(SometimesLogs(), data, data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return trainer, list(csv.DictReader(f))


def test_metrics_refresh_only_after_a_log_reads_the_same(tmp_path, monkeypatch):
    """The logger connector's refresh skipped on training steps that logged nothing: every metric a callback reads,
    after every step and after validation, and every row the logger writes, are those of Lightning's public path;
    and the refresh ran once less for each of those steps (8 of the 16 in each of the 2 epochs)."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection, _ResultMetric

    runs = {}
    for enabled in (True, False):
        reader = MetricsReader()
        _, rows = _sometimes_logs_fit(tmp_path / f"read{enabled}", FastPath(enabled=enabled), [reader])
        runs[enabled] = reader.seen, rows
    assert runs[True] == runs[False]
    assert any(where == "validation" for where, *_ in runs[True][0])
    assert len(runs[True][1]) > 10  # the logger wrote rows

    refreshes, moves = [], []
    metrics, to = _ResultCollection.metrics, _ResultMetric.to

    def counted(self, on_step):
        refreshes[-1] += 1
        return metrics(self, on_step)

    def counted_to(self, *args, **kwargs):
        moves[-1] += 1
        return to(self, *args, **kwargs)

    monkeypatch.setattr(_ResultCollection, "metrics", counted)
    monkeypatch.setattr(_ResultMetric, "to", counted_to)
    for enabled, epochs in ((True, 2), (False, 2), (True, 4), (False, 4)):
        refreshes.append(0)
        moves.append(0)
        fast = FastPath(enabled=enabled)
        trainer, _ = _sometimes_logs_fit(tmp_path / f"count{enabled}{epochs}", fast, epochs=epochs)
        assert not fast.active and "on_batch_end" not in vars(trainer._logger_connector)  # undone
        assert not any("to" in vars(m) for m in trainer.fit_loop.epoch_loop._results.values())
    assert refreshes[1] - refreshes[0] == 16
    # Lightning's walk that moves a logged metric's state: on the fast path a fixed number (a metric's first logs,
    # and Lightning's own before and after training), whatever the epochs; on the public path of Lightning 2.6 on
    # every log call (twice the epochs, twice the calls: 12 + 8 + 8 in training, 2 in each of the 4 validations of
    # 2 epochs), while 2.2 moved a state only when it created it
    assert moves[2] == moves[0] <= moves[1]
    assert moves[3] - moves[1] >= 12 + 8 + 8 + 8 or (L.__version__.startswith("2.2.") and moves[3] == moves[1])


@pytest.mark.parametrize("accumulate", [1, 3, "scheduled"])
def test_gradient_accumulation_is_unchanged(tmp_path, accumulate):
    """The shortcut for `accumulate_grad_batches == 1` leaves accumulation alone: fixed (3), and raised from 1 to 2
    after the first epoch by a `GradientAccumulationScheduler`, give the public path's steps and weights."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    runs = {}
    for enabled in (True, False):
        torch.manual_seed(0)
        model = SometimesLogs()
        extra = {"callbacks": [FastPath(enabled=enabled)]}
        if accumulate == "scheduled":
            extra["callbacks"].append(GradientAccumulationScheduler({1: 2}))
        else:
            extra["accumulate_grad_batches"] = accumulate
        trainer = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            **extra,
        )
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(60, 4)), batch_size=4))  # 15 batches an epoch
        runs[enabled] = trainer.global_step, model.layer.weight.detach().clone()
    expected_steps = {1: 30, 3: 10, "scheduled": 15 + 8}[accumulate]  # Lightning steps on an epoch's last batch
    assert runs[True][0] == runs[False][0] == expected_steps
    assert torch.equal(runs[True][1], runs[False][1])


class Boom(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 3:
            raise RuntimeError("boom")


def test_fast_path_is_undone_when_training_raises(small_corpus, tmp_path):
    dm = NamesDataModule(path=str(small_corpus))
    model = model_for(dm)
    fast = FastPath(callbacks="all")
    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, 10, callbacks=[fast, boom]).fit(model, datamodule=dm)
    assert not fast.active and type(model) is MakemoreModule
    assert not _shadowed(model)
    assert not _shadowed(boom)
    assert "__signature__" not in vars(MakemoreModule.training_step)


def test_user_callbacks_are_touched_only_when_asked(small_corpus, tmp_path):
    dm = NamesDataModule(path=str(small_corpus))
    for allowed, expect_shadowed in ((), False), ("all", True):
        spy = Spy()
        _trainer(tmp_path, 3, callbacks=[FastPath(callbacks=allowed), spy]).fit(model_for(dm), datamodule=dm)
        assert spy.seen[0]["spy_untouched"] is not expect_shadowed


def test_untested_lightning_versions_run_the_public_path(small_corpus, tmp_path, monkeypatch):
    # the range of the tests (2.2 and 2.6 in CI) includes the releases between, as the monitors' gate does
    from callbacks import _internals

    assert fastpath.SUPPORTED == _internals.LIGHTNING_TESTED
    assert fastpath.supported("2.6.0") and fastpath.supported("2.4.1") and not fastpath.supported("9.0.0")
    monkeypatch.setattr(fastpath, "SUPPORTED", ((9, 0), (9, 1)))
    spy = Spy()
    dm = NamesDataModule(path=str(small_corpus))
    _trainer(tmp_path, 3, callbacks=[FastPath(callbacks="all"), spy]).fit(model_for(dm), datamodule=dm)
    assert not any(s["active"] or s["class_swapped"] or s["module_hooks"] for s in spy.seen)


def test_fast_class_keeps_the_name_and_behaviour():
    model = MakemoreModule(vocab=[".", "a"], block_size=2, n_hidden=4)
    fast_cls = fastpath._fast_class(MakemoreModule)
    assert fast_cls.__name__ == "MakemoreModule" and issubclass(fast_cls, L.LightningModule)
    assert fastpath._fast_class(MakemoreModule) is fast_cls  # built once per class
    model.__class__ = fast_cls
    model._current_fx_name = "training_step"
    assert vars(model)["_current_fx_name"] == "training_step"
    model.extra = torch.nn.Linear(1, 1)  # anything else still goes through nn.Module
    assert "extra" in dict(model.named_children())
