"""CallbackGroup: the members log what they log alone, and their checkpoint state moves between grouped and not."""

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks import ActivationMonitor, CallbackGroup, HealthMonitor, UpdateRatioMonitor
from callbacks._cadence import Cadence, Moment
from callbacks._recorder import Recorder
from tests.callbacks_helpers import TanhMLP, fixed_loader, histograms, read_events, saturating_batch, scalars, trainer


def test_grouped_monitors_log_as_alone(tmp_path):
    logs = {}
    for grouped in (False, True):
        members = [ActivationMonitor(every_n_steps=2, histogram_every_n_steps=2), UpdateRatioMonitor(every_n_steps=2)]
        t = trainer(tmp_path / str(grouped), [CallbackGroup(members)] if grouped else members, max_steps=4)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 4))
        events = read_events(t.logger.log_dir)
        logs[grouped] = (sorted(events.Tags()["scalars"]), sorted(histograms(events, "activation/act")))
        assert members[1].steps == [0, 1, 3]
    assert logs[True] == logs[False]
    assert "activation/act/saturation" in logs[True][0] and logs[True][1] == [0, 1, 3]


@pytest.mark.parametrize("setup", ["alone", "two_alone", "group", "health"])
def test_one_recorder_does_the_work_of_each_callback_lightning_sees(tmp_path, monkeypatch, setup):
    """Every recorder whose hooks run during a fit is the ``recorder`` of a callback the Trainer was given, one per
    such callback; a group's members make none of their own, and their parts are the group's recorder's."""
    ran: dict[int, Recorder] = {}  # the recorders whose step hooks ran (a spy: counts, then calls the real hook)
    for hook in ("on_fit_start", "on_before_optimizer_step"):
        real = getattr(Recorder, hook)

        def spy(self: Recorder, *args: Any, _real: Any = real, **kwargs: Any) -> None:
            ran[id(self)] = self
            _real(self, *args, **kwargs)

        monkeypatch.setattr(Recorder, hook, spy)
    members = [ActivationMonitor(every_n_steps=2), UpdateRatioMonitor(every_n_steps=2)]
    given: list[Callback] = {
        "alone": members[:1],
        "two_alone": members,
        "group": [CallbackGroup(members)],
        "health": [HealthMonitor(every_n_steps=2, report=False, warn=False)],
    }[setup]
    assert not any(isinstance(cb, Recorder) for cb in given)  # monitors and groups are not recorders themselves
    t = trainer(tmp_path, given, max_steps=4)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 4))
    recorders = [cb.recorder for cb in given]
    assert sorted(ran) == sorted(id(r) for r in recorders) and len(set(map(id, recorders))) == len(given)
    grouped = [m for cb in given if isinstance(cb, CallbackGroup) for m in cb.callbacks]
    if grouped:
        (recorder,) = recorders
        assert all(m._recorder is None for m in grouped)  # a member never made a recorder of its own
        assert recorder.parts[: len(grouped)] == tuple(m.part for m in grouped)
    if setup == "health":  # its own parts given at construction, after the four monitors'
        (health,) = given
        assert health.recorder.parts[4:] == (health.diagnoses, health.transformer, health.loss_input)
        assert health.recorder.trace and health.recorder.report is None
    assert 0 in scalars(read_events(t.logger.log_dir), "activation/act/mean")  # and the work was done


def test_checkpoint_state_moves_between_grouped_and_alone(tmp_path):
    x = saturating_batch(16)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    first = UpdateRatioMonitor(every_n_steps=2)
    trainer(tmp_path, [CallbackGroup([first]), ckpt], enable_checkpointing=True, max_steps=4).fit(
        TanhMLP(), fixed_loader(x, 8)
    )
    second = UpdateRatioMonitor(every_n_steps=2)  # resumed alone, from the grouped run's checkpoint
    trainer(tmp_path, [second], max_steps=8).fit(
        TanhMLP(), fixed_loader(x, 8), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert second.steps == [0, 1, 3, 5, 7]
    assert second.history["head.weight"][:3] == first.history["head.weight"]


def test_rejects_non_callbacks():
    with pytest.raises(ValueError, match="Expected every member to be a lightning Callback"):
        CallbackGroup([object()])


def _hooks_of(callback: Callback) -> type:
    """A Callback subclass overriding every hook, each appending its name to ``callback.calls``."""
    names = [
        n for n, v in vars(Callback).items() if callable(v) and (n.startswith("on_") or n in ("setup", "teardown"))
    ]
    names = [n for n in names if n not in ("on_save_checkpoint", "on_load_checkpoint")]

    def make(name: str) -> Any:
        def hook(self, *args, **kwargs) -> None:
            self.calls.append(name)

        return hook

    return type(
        "EveryHook", (Callback,), {"__init__": lambda self: setattr(self, "calls", []), **{n: make(n) for n in names}}
    )


def test_group_forwards_every_hook_fit_validate_test_predict(tmp_path):
    every_hook = _hooks_of(Callback)
    runs = {}
    for grouped in (False, True):
        member = every_hook()
        t = trainer(tmp_path / str(grouped), [CallbackGroup([member])] if grouped else [member], max_steps=2)
        model = TanhMLP()
        loader = fixed_loader(saturating_batch(), 2)
        t.fit(model, loader, loader)
        t.validate(model, loader)
        t.test(model, loader)
        t.predict(model, loader)
        runs[grouped] = member.calls
    assert runs[True] == runs[False]
    assert {"on_test_batch_end", "on_predict_batch_end", "on_test_epoch_start", "on_predict_start"} <= set(runs[True])


def test_sleep_trick_is_active_and_results_are_the_same_without_it(tmp_path, monkeypatch):
    from callbacks import _internals

    if not _internals.IS_TESTED:
        pytest.skip(f"the sleep trick is off on this Lightning ({_internals.LIGHTNING})")

    def fit(name: str) -> tuple[dict, list[int]]:
        monitor = ActivationMonitor(every_n_steps=3, histogram_every_n_steps=6)
        shadowed: list[int] = []

        class Probe(Callback):
            def on_before_backward(self, trainer, pl_module, loss) -> None:
                if vars(monitor).get("on_train_batch_end", "awake") is None:
                    shadowed.append(trainer.global_step)

        t = trainer(tmp_path / name, [monitor, Probe()], max_steps=8)
        torch.manual_seed(0)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 8))
        acc = read_events(t.logger.log_dir)
        tags = acc.Tags()
        return {tag: scalars(acc, tag) for tag in tags["scalars"]}, shadowed, sorted(histograms(acc, "activation/act"))

    with_trick, shadowed, hists = fit("with")
    assert shadowed == [1, 3, 4, 6]  # asleep except on step 0, the logged steps 2, 5 and the final step 7
    monkeypatch.setattr(_internals, "SHADOW_STEP_HOOKS", False)
    without, shadowed_without, hists_without = fit("without")
    assert shadowed_without == []
    assert without == with_trick and hists == hists_without == [0, 5, 7]
    assert set(with_trick["activation/act/mean"]) == {0, 2, 5}


def test_cadence_next_step_and_moments():
    """The cadence is a pure function of the step and the fit's first and last steps (hand-computed steps)."""
    cadence = Cadence(every_n_steps=50, histogram_every_n_steps=500)
    assert cadence.resolve(log_every_n_steps=7, histograms=True) == cadence  # nothing left to fill
    assert [cadence.next_step(s, 999) for s in (0, 1, 48, 49, 50, 998, 999)] == [0, 49, 49, 49, 99, 999, 999]
    assert cadence.moment(0, 0, 999) == Moment(scalars=True, histograms=True, figure=True)  # initialisation
    assert cadence.moment(49, 0, 999) == Moment(scalars=True, histograms=False, figure=False)
    assert cadence.moment(499, 0, 999) == Moment(scalars=True, histograms=True, figure=True)
    # at most about five figures over the fit, on histogram steps: the 2 here each have their figure
    assert [s for s in range(1000) if cadence.moment(s, 0, 999).figure] == [0, 499, 999]
    # 10,000 steps: 20 histogram steps, a figure every 2000 steps (4 of them apart), plus the first and the last
    assert [s for s in range(10000) if cadence.moment(s, 0, 9999).figure] == [0, 1999, 3999, 5999, 7999, 9999]
    # the first figure of a fit resumed at step 120: its first histogram step
    assert [s for s in range(120, 1000) if cadence.moment(s, 120, 999).figure] == [499, 999]
    assert Cadence(0, 500).next_step(1, 999) == 499  # scalars off: histograms only
    assert Cadence(0, 0).next_step(1, 999) == 999  # only the final step is left
    # the defaults, from the Trainer: scalars every log_every_n_steps, histograms 10x rarer (0: not recorded)
    assert Cadence().resolve(log_every_n_steps=5, histograms=True) == Cadence(5, 50, None)
    assert Cadence().resolve(log_every_n_steps=5, histograms=False) == Cadence(5, 0, None)
    # a probe without histograms has its figures on its scalar steps (here the first and then every 20 steps)
    scalars_only = Cadence(every_n_steps=5, figure_every_n_steps=20).resolve(log_every_n_steps=1, histograms=False)
    figures = [s for s in range(100) if scalars_only.moment(s, 0, 99, from_histograms=False).figure]
    assert figures == [0, 19, 39, 59, 79, 99]
