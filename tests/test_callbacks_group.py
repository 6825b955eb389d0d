"""CallbackGroup: the members log what they log alone, and their checkpoint state moves between grouped and not."""

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ActivationMonitor, CallbackGroup, UpdateRatioMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, histograms, read_events, saturating_batch, trainer


def test_grouped_monitors_log_as_alone(tmp_path):
    logs = {}
    for grouped in (False, True):
        members = [ActivationMonitor(every_n_steps=2, histogram_every_n_steps=2), UpdateRatioMonitor(every_n_steps=2)]
        t = trainer(tmp_path / str(grouped), [CallbackGroup(members)] if grouped else members, max_steps=4)
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 4))
        events = read_events(t.logger.log_dir)
        logs[grouped] = (sorted(events.Tags()["scalars"]), sorted(histograms(events, "activation/act")))
        assert members[1].steps == [1, 3]
    assert logs[True] == logs[False]
    assert "activation/act/saturation" in logs[True][0] and logs[True][1] == [1, 3]


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
    assert second.steps == [1, 3, 5, 7]
    assert second.history["head.weight"][:2] == first.history["head.weight"]


def test_rejects_non_callbacks():
    with pytest.raises(ValueError, match="Expected every member to be a lightning Callback"):
        CallbackGroup([object()])
