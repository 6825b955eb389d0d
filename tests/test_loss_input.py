"""The loss-input check: probabilities given to ``cross_entropy``, non-log-probabilities given to ``nll_loss``.

Each case is a real fit whose ``training_step`` makes (or avoids) the mistake; the expected rows and the loss floor
are computed here by hand.
"""

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
from callbacks.judges.loss_input import LossInputCheck, softmax_floor
from callbacks.probes.loss_input import LossInputProbe, LossInputs

CLASSES, BATCH, SEQ = 5, 16, 3


class Classifier(L.LightningModule):
    def __init__(self, loss: str) -> None:
        super().__init__()
        self.loss = loss
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, CLASSES))

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.net(x)
        if self.loss == "softmax then cross_entropy":
            return F.cross_entropy(z.softmax(-1), y)
        if self.loss == "softmax then CrossEntropyLoss":
            return nn.CrossEntropyLoss()(z.softmax(-1), y)
        if self.loss == "logits to nll_loss":
            return F.nll_loss(z, y)
        if self.loss == "softmax then nll_loss":
            return F.nll_loss(z.softmax(-1), y)
        if self.loss == "log_softmax then nll_loss":
            return F.nll_loss(z.log_softmax(-1), y)
        if self.loss == "log_softmax then cross_entropy":
            return F.cross_entropy(z.log_softmax(-1), y)  # log_softmax is idempotent: a correct loss
        if self.loss == "raises at step 1":
            if self.global_step == 1:
                raise RuntimeError("boom")
            return F.cross_entropy(z.softmax(-1), y)
        return F.cross_entropy(z, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Sequences(L.LightningModule):
    """(N, C, T) inputs, the class dimension second, as ``cross_entropy`` takes a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, CLASSES)

    def training_step(self, batch, batch_idx):
        x, y = batch  # (N, T, 8), (N, T)
        return F.cross_entropy(self.head(x).softmax(-1).transpose(1, 2), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(sequences: bool = False):
    g = torch.Generator().manual_seed(0)
    shape = (4 * BATCH, SEQ) if sequences else (4 * BATCH,)
    x, y = torch.randn(*shape, 8, generator=g), torch.randint(0, CLASSES, shape, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)


def fit(model, tmp_path, callbacks, steps=8, sequences=False):
    trainer = L.Trainer(
        max_steps=steps, log_every_n_steps=2, logger=CSVLogger(tmp_path), callbacks=callbacks, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(sequences))


def loss_findings(monitor: HealthMonitor) -> list:
    return [f for f in monitor.findings if f.key.startswith("loss_input/")]


@pytest.mark.parametrize(
    ("loss", "key", "words"),
    [
        ("softmax then cross_entropy", "loss_input/cross_entropy", f"each of its {BATCH} input rows is >= 0"),
        ("softmax then CrossEntropyLoss", "loss_input/cross_entropy", "a softmax before the loss"),
        ("softmax then nll_loss", "loss_input/nll_loss", "`nll_loss` is given probabilities"),
        ("logits to nll_loss", "loss_input/nll_loss", "not log-probabilities"),
    ],
)
def test_a_loss_given_the_wrong_thing_is_found_at_step_zero_with_its_fix(tmp_path, loss, key, words):
    monitor = HealthMonitor(report=False, warn=False)
    fit(Classifier(loss), tmp_path, [monitor])
    (finding,) = loss_findings(monitor)
    assert (finding.key, finding.step, finding.severity) == (key, 0, "problem")
    if key == "loss_input/cross_entropy":  # the edit, as an action no program applies
        assert finding.action == Action("loss_logits", ("cross_entropy",), None, "every input row sums to 1")
        assert finding.action.describe() == "logits to cross_entropy (no softmax before it)"
    else:
        assert finding.action is None
    assert words in finding.message
    if key == "loss_input/cross_entropy":
        # the floor of cross_entropy(softmax(p)) over 5 classes: -log(e / (e + 4)) = ln(e + 4) - 1, by hand 0.905
        assert math.isclose(softmax_floor(CLASSES), 0.9049, abs_tol=1e-4)
        assert "cannot go below 0.90" in finding.message and "Pass the logits" in finding.fix
    else:
        assert "log_softmax" in finding.fix


@pytest.mark.parametrize(
    "loss", ["logits to cross_entropy", "log_softmax then nll_loss", "log_softmax then cross_entropy"]
)
def test_a_loss_given_what_it_expects_has_no_finding(tmp_path, loss):
    monitor = HealthMonitor(report=False, warn=False)
    fit(Classifier(loss), tmp_path, [monitor])
    assert loss_findings(monitor) == []


def test_the_loss_floor_is_the_loss_of_a_one_hot_probability_on_the_target():
    for classes in (2, 5, 27):
        p = torch.zeros(1, classes, dtype=torch.float64)
        p[0, 0] = 1.0  # the best a softmax output can be: one-hot on the target
        assert math.isclose(F.cross_entropy(p, torch.tensor([0])).item(), softmax_floor(classes), rel_tol=1e-12)
    assert math.isclose(softmax_floor(27), 2.357, abs_tol=1e-3)  # the names' 27 characters


class Readouts(Judge):
    """Keeps every readout of the probe it reads (a judge that finds nothing)."""

    reads = ("loss_input",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[LossInputs] = []

    def observe(self, step, readouts):
        self.seen.append(readouts["loss_input"])
        return []


def test_rows_count_samples_times_positions_and_only_the_first_checked_steps_are_watched(tmp_path):
    keep = Readouts()
    monitor = Monitor(LossInputProbe(Cadence(every_n_steps=2), checked_steps=2), [keep, LossInputCheck()], warn=False)
    fit(Sequences(), tmp_path, [monitor], steps=8, sequences=True)
    # recorded: step 0 (init) and every 2nd step (1, 3, 5, 7); checked: the first two of them
    assert [(r.step, r.checked) for r in keep.seen] == [(0, True), (1, True), (3, False), (5, False), (7, False)]
    first = keep.seen[0]
    assert (first.cross_entropy_rows, first.cross_entropy_probability_rows, first.classes) == (BATCH * SEQ,) * 2 + (
        CLASSES,
    )
    assert keep.seen[2].cross_entropy_rows == 0  # not watched
    assert [f.key for f in monitor.part.record.findings] == ["loss_input/cross_entropy"]


def test_the_function_mode_is_off_after_the_checked_steps_and_after_an_exception(tmp_path):
    monitor = HealthMonitor(report=False, warn=False)
    with pytest.raises(RuntimeError, match="boom"):
        fit(Classifier("raises at step 1"), tmp_path, [monitor])
    assert torch.overrides._get_current_function_mode_stack() == []  # (torch's only way to see the stack)
    assert [f.key for f in loss_findings(monitor)] == ["loss_input/cross_entropy"]  # found on step 0 all the same
    fit(Classifier("softmax then cross_entropy"), tmp_path, [monitor])
    assert torch.overrides._get_current_function_mode_stack() == []


class ModesSeen(L.Callback):
    """The function modes on at each point of the first steps (torch's only way to see the stack)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []

    def _note(self, trainer, where: str) -> None:
        if trainer.global_step < 2:
            self.seen.append((where, trainer.global_step, len(torch.overrides._get_current_function_mode_stack())))

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._note(trainer, "loss computed")

    def on_after_backward(self, trainer, pl_module) -> None:
        self._note(trainer, "backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._note(trainer, "optimizer step")


def test_the_function_mode_watches_the_forward_only(tmp_path):
    # the backward and the optimizer's step (Adam's foreach ops: hundreds of calls) run without the mode
    modes = ModesSeen()
    fit(Classifier("softmax then cross_entropy"), tmp_path, [modes, HealthMonitor(report=False, warn=False)])
    assert modes.seen == [
        ("loss computed", 0, 1),  # (called before the monitor's hook, which turns the mode off)
        ("backward", 0, 0),
        ("optimizer step", 0, 0),
        ("loss computed", 1, 1),  # step 1: recorded (every 2 steps), still among the checked ones
        ("backward", 1, 0),
        ("optimizer step", 1, 0),
    ]


def test_bad_arguments_say_what_to_pass():
    with pytest.raises(ValueError, match="`checked_steps` to be an int >= 0"):
        LossInputProbe(checked_steps=-1)


def test_a_resumed_fit_keeps_the_finding_and_does_not_warn_it_again(tmp_path):
    """Found on step 0, saved in the checkpoint at step 4, the resumed fit (steps 4-7) ends with the same one
    finding, warned by the first fit only."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = HealthMonitor(report=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    trainer = L.Trainer(
        max_steps=4, log_every_n_steps=2, logger=CSVLogger(tmp_path), callbacks=[first, ckpt], accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="`cross_entropy` is given probabilities"):
        trainer.fit(Classifier("softmax then cross_entropy"), loader())
    resumed = HealthMonitor(report=False)
    trainer = L.Trainer(
        max_steps=8, log_every_n_steps=2, logger=CSVLogger(tmp_path), callbacks=[resumed], accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier("softmax then cross_entropy"), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not [w for w in caught if "is given probabilities" in str(w.message)]
    assert [(f.key, f.step) for f in loss_findings(resumed)] == [("loss_input/cross_entropy", 0)]
