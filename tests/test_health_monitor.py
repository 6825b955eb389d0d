"""HealthMonitor end to end: the check at initialisation on the console, one report per fit in the run folder and in
TensorBoard's Text tab, learning-rate advice, and a checkpoint of the four monitors resuming under it."""

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from callbacks import HealthMonitor
from tests.callbacks_helpers import TanhMLP, fixed_loader, read_events, saturating_batch, trainer

DATA = Path(__file__).parent / "data"
CLASSES = 27


class Classifier(L.LightningModule):
    """An MLP over 27 classes; ``scale`` multiplies the output layer's initial weights (the lecture's naive init
    makes the first softmax confidently wrong)."""

    def __init__(self, scale: float = 1.0, lr: float = 0.1, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(16, 16), nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, CLASSES)
        with torch.no_grad():
            self.head.weight.mul_(scale)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.body(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(steps: int, batch: int = 64) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps * batch, 16, generator=g), torch.randint(0, CLASSES, (steps * batch,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _uniform_loss_at_init(model: Classifier, loader: torch.utils.data.DataLoader) -> float:
    x, y = next(iter(loader))
    with torch.no_grad():
        return nn.functional.cross_entropy(model.head(model.body(x)), y).item()


def test_an_over_confident_init_is_found_at_step_0_printed_and_reported(tmp_path, capsys):
    model = Classifier(scale=40.0)
    loader = _data(6)
    expected = _uniform_loss_at_init(model, loader)  # the loss of the first batch, computed here
    monitor = HealthMonitor(every_n_steps=2)
    t = trainer(tmp_path, [monitor], max_steps=6, log_every_n_steps=2)
    t.fit(model, loader)
    (init,) = [f for f in monitor.findings if f.key == "init/loss"]
    assert init.step == 0 and init.where == "head" and f"{expected:.2f}" in init.message
    assert f"{math.log(CLASSES):.2f} = ln(27)" in init.message and "`head` (Linear, out_features=27)" in init.message
    err = capsys.readouterr().err
    at_init = [f for f in monitor.findings if f.step == 0 and f.severity == "problem"]
    block = "\n".join([f"init check: {len(at_init)} problems", *(f"  - {f.text}" for f in at_init)])
    assert block in err  # one block when training starts: the count, then a line each
    # one report: health.md in the run folder, its first line the verdict, and the same text in the Text tab
    path = Path(t.logger.log_dir) / "health.md"
    text = path.read_text()
    assert text.splitlines()[0] == f"# Training health: {monitor.report.verdict}"
    assert monitor.report.verdict.startswith(f"{len(at_init)} problems found in 6 steps") and "Step 0 · `head`" in text
    assert f"health: {monitor.report.verdict}" in err
    acc = read_events(t.logger.log_dir)
    (event,) = acc.Tensors("health/report/text_summary")
    assert event.tensor_proto.string_val[0].decode() == text


def test_a_healthy_fit_says_so_in_one_line(tmp_path, capsys):
    monitor = HealthMonitor(every_n_steps=2)
    t = trainer(tmp_path, [monitor], max_steps=6, log_every_n_steps=2)
    t.fit(Classifier(scale=1.0, lr=0.01), _data(6))
    assert not [f for f in monitor.findings if f.severity == "problem"]
    text = (Path(t.logger.log_dir) / "health.md").read_text()
    assert text.strip() == "# Training health: healthy, no problem found in 6 steps"
    assert "init check: no problem found" in capsys.readouterr().err


def test_the_report_can_be_switched_off_and_no_file_is_written(tmp_path):
    t = trainer(tmp_path, [HealthMonitor(every_n_steps=2, report=False)], max_steps=2, log_every_n_steps=2)
    t.fit(Classifier(scale=0.01), _data(2))
    assert not (Path(t.logger.log_dir) / "health.md").exists()


def test_learning_rate_advice_from_the_update_history(tmp_path):
    """SGD at lr 5 on this net: every weight's update is far above a thousandth of it."""
    monitor = HealthMonitor(every_n_steps=1, warn=False)
    t = trainer(tmp_path, [monitor], max_steps=40, log_every_n_steps=1)
    t.fit(Classifier(scale=0.01, lr=5.0), _data(40))
    (f,) = [f for f in monitor.findings if f.key == "lr/model"]
    median = float(f.message.split("are 10^")[1].split(" ")[0])
    assert median > -2.0 and "too high" in f.message and "Divide the learning rate" in f.fix
    # the judge's median is that of the monitor's own history (peak lr, after the first tenth)
    ratios = monitor.callbacks[3].history
    typical = sorted(sorted(v[4:])[len(v[4:]) // 2] for v in ratios.values())
    assert median == pytest.approx(typical[len(typical) // 2], abs=0.051)


def test_the_four_monitors_checkpoint_resumes_under_health_monitor(tmp_path):
    """tests/data/monitors_v1.ckpt (the four monitors, before the rewrite): its state keys are HealthMonitor's
    members' keys, so the update-ratio curve continues."""
    monitor = HealthMonitor(every_n_steps=2, histogram_every_n_steps=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=12)
    t = trainer(tmp_path, [monitor, ckpt], max_steps=12, enable_checkpointing=True)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 16), ckpt_path=str(DATA / "monitors_v1.ckpt"))
    ratio = monitor.callbacks[3]
    assert ratio.steps == [1, 3, 5, 7, 9, 11]
    # and HealthMonitor's own state (its diagnoses' record) is saved under its own key
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    diagnoses = state[monitor.state_key]["diagnoses"]
    assert {k: diagnoses[k] for k in ("warned", "streaks", "findings")} == {"warned": {}, "streaks": {}, "findings": []}
    assert sorted(diagnoses["judges"]) == ["0:InitCheck", "1:LearningRateAdvice", "2:LossSpikes"]  # judges with a state
    assert "UpdateRatioMonitor{'params': [], 'min_ndim': 2}" in state


def test_a_resumed_fit_ends_with_the_same_report_as_the_fit_run_straight_through(tmp_path):
    """Two epochs of 6 steps at a high learning rate from an over-confident init, straight through (saving a
    checkpoint after the first epoch), and again resumed from that checkpoint: the same findings, the check at
    initialisation's included, and the same health.md."""

    def fit(root: Path, ckpt_path: str | None) -> tuple[HealthMonitor, str]:
        monitor = HealthMonitor(every_n_steps=1, warn=False)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
        t = trainer(root, [monitor, ckpt], max_epochs=2, log_every_n_steps=1, enable_checkpointing=True)
        t.fit(Classifier(scale=40.0, lr=2.0), _data(6), ckpt_path=ckpt_path)
        return monitor, (Path(t.logger.log_dir) / "health.md").read_text()

    straight, report = fit(tmp_path / "straight", None)
    (first_epoch,) = (tmp_path / "straight" / "ckpt").glob("epoch=0-*.ckpt")
    resumed, resumed_report = fit(tmp_path / "resumed", str(first_epoch))
    keys = [f.key for f in straight.findings]
    assert "init/loss" in keys and any(f.step >= 6 for f in straight.findings)  # found before and after the resume
    assert resumed.findings == straight.findings
    assert resumed_report == report


def test_invalid_arguments():
    with pytest.raises(ValueError, match="Expected `trace` to be a bool"):
        HealthMonitor(trace="yes")
    with pytest.raises(ValueError, match="Expected `num_classes`"):
        HealthMonitor(num_classes=-1)
