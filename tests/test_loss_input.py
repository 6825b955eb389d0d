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


def fit(model, tmp_path, callbacks, steps=8, sequences=False, data=None, **settings):
    """A quiet fit of ``steps``: on ``data`` (default: :func:`loader`), with more Trainer ``settings``."""
    settings = {"log_every_n_steps": 2, **settings}
    trainer = L.Trainer(
        max_steps=steps, logger=CSVLogger(tmp_path), callbacks=callbacks, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **settings,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data if data is not None else loader(sequences))


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


# ---------------------------------------------------------------------------------------- too few examples a step
def small_loader(batch: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8 * batch, 8, generator=g), torch.randint(0, CLASSES, (8 * batch,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


@pytest.mark.parametrize(
    ("batch", "accumulate", "found"),
    [(2, 1, "2 examples (one batch"), (7, 1, "7 examples"), (8, 1, None), (2, 4, None), (2, 3, "6 examples (2 per")],
)
def test_too_few_examples_per_optimizer_step_is_a_problem_with_a_batch_size_action(tmp_path, batch, accumulate, found):
    monitor = HealthMonitor(report=False, warn=False)
    model = Classifier("logits to cross_entropy")
    fit(
        model,
        tmp_path,
        [monitor],
        4,
        data=small_loader(batch),
        accumulate_grad_batches=accumulate,
        log_every_n_steps=50,
    )
    small = [f for f in monitor.findings if f.key == "batch/size"]
    if found is None:  # 8 rows, or 2 rows x 4 micro-batches: 8 examples a step
        assert small == []
        return
    (f,) = small
    assert (
        f.severity == "problem" and found in f.message and f.action == Action("batch_size", (), 32, f.action.evidence)
    )


# ---------------------------------------------------------------------------------------- wrong labels
def test_late_rows_are_counted_from_the_rows_own_losses(tmp_path):
    """lr 0: the model never changes, so each late row's loss is known beforehand; the probe's counts must match."""
    keep = Readouts()
    monitor = Monitor(LossInputProbe(Cadence(every_n_steps=1), checked_steps=0), [keep], warn=False)
    model = Classifier("logits to cross_entropy")
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.net[2].weight.mul_(30)  # confident logits: some rows fit well, some worse than uniform
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * BATCH, 8, generator=g), torch.randint(0, CLASSES, (4 * BATCH,), generator=g)
    y[::5] = -100  # cross_entropy's ignore_index: left out of the loss, and of the counts
    with torch.no_grad():
        losses = F.cross_entropy(model.net(x), y.clamp(min=0), reduction="none").masked_fill(y < 0, float("nan"))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    fit(model, tmp_path, [monitor], 10, data=data, log_every_n_steps=50)
    late = [r for r in keep.seen if r.late_rows]
    # the last fifth of 10 steps: global steps 8 and 9, the 1st and 2nd batches of the third epoch (4 a epoch)
    assert [r.step for r in late] == [8, 9]
    for r, batch in zip(late, (0, 1), strict=True):
        rows = losses[batch * BATCH : (batch + 1) * BATCH]
        rows = rows[~rows.isnan()]
        assert r.late_rows == len(rows) < BATCH
        assert r.late_good_rows == int((rows < 0.5 * math.log(CLASSES)).sum())
        assert r.late_bad_rows == int((rows > math.log(CLASSES)).sum())
        assert r.late_loss_sum == pytest.approx(rows.sum().item(), rel=1e-5)
        assert r.late_loss_squares == pytest.approx(rows.square().sum().item(), rel=1e-5)
        assert r.dropout is False and r.classes == CLASSES  # C is read on a late step too (the judge's ln C)
    assert 0 < late[0].late_bad_rows < BATCH and 0 < late[0].late_good_rows < BATCH  # both kinds present
    assert all(r.late_rows == 0 for r in keep.seen if r.step < 8)


class Blobs(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


@pytest.mark.parametrize("noisy", [False, True])
def test_wrong_labels_are_found_late_with_a_clean_labels_action(tmp_path, noisy):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2000,), generator=g)
    centres = torch.tensor([[4.0, 0], [-4, 0], [0, 4], [0, -4]])
    x = centres[y] + torch.randn(2000, 2, generator=g)  # four separate blobs: a clean task is learnt to ~100 %
    if noisy:  # 40 % of the labels shuffled, as the fault zoo's operator
        wrong = torch.rand(2000, generator=g) < 0.4
        y = y.clone()
        y[wrong] = y[wrong][torch.randperm(int(wrong.sum()), generator=g)]
    monitor = HealthMonitor(every_n_steps=5, report=False, warn=False)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)
    fit(Blobs(), tmp_path, [monitor], 300, data=data, log_every_n_steps=50)
    found = [f for f in monitor.findings if f.key == "data/labels"]
    if not noisy:
        assert found == []
        return
    (f,) = found
    assert f.severity == "problem" and f.action.kind == "clean_labels" and "worse than a uniform guess" in f.message


def test_the_wrong_labels_judge_by_hand():
    from callbacks.judges.base import Readouts as Readings
    from callbacks.judges.data import MIN_ROWS, NoisyLabels

    def judged(rows: int, good: int, bad: int) -> list:
        judge = NoisyLabels()
        r = LossInputs(9, False, 0, 0, 0, 0, 0, math.nan, 5, 1, rows, good, bad)
        judge.observe(9, Readings.of(r))
        state = judge.state_dict()
        resumed = NoisyLabels()
        resumed.load_state_dict(state)  # a resumed fit judges the rows read before it too
        return resumed.conclude(9, Readings.of(r))

    assert [f.key for f in judged(1000, 600, 150)] == ["data/labels"]  # 60 % fit well, 15 % worse than uniform
    assert judged(1000, 600, 149) == []  # under 15 %
    assert judged(1000, 500, 300) == []  # no well-fit majority: a task uncertain by nature
    assert judged(MIN_ROWS - 1, 150, 40) == []  # too few rows read


def test_the_wrong_labels_judge_from_the_validation_loss_by_hand():
    """An uncertain task (no well-fit majority): the late rows' mean loss against the logged validation loss."""
    from callbacks.judges.base import Readouts as Readings
    from callbacks.judges.data import NoisyLabels
    from callbacks.probes.validation import Validation

    def judged(
        mean: float, std: float, val: float | None, rows: int = 1000, dropout: bool = False, good: int = 300
    ) -> list:
        judge = NoisyLabels()
        sums = (mean * rows, (std**2 + mean**2) * rows)  # rows whose losses have this mean and std
        r = LossInputs(9, False, 0, 0, 0, 0, 0, math.nan, 27, 1, rows, good, 150, *sums, dropout=dropout)
        judge.observe(9, Readings.of(r))
        resumed = NoisyLabels()
        resumed.load_state_dict(judge.state_dict())
        readouts = [r] + ([Validation(10, val, "val_loss")] if val is not None else [])
        return resumed.conclude(10, Readings.of(*readouts))

    # 1000 rows of std 1: a standard error of 1 / sqrt(1000) = 0.0316, so 2.5 of them is 0.079 < the 0.12 nats
    (f,) = judged(2.7, 1.0, 2.5)
    assert f.key == "data/labels" and f.action.kind == "label_source"  # the split's labels, fixed where they come from
    assert "2.700 (± 0.032, 1000 rows)" in f.message and "2.500 (`val_loss`)" in f.message and "0.200 nats" in f.message
    assert judged(2.7, 1.0, 2.59) == []  # 0.11 nats: under GAP
    assert judged(3.4, 1.0, 3.0) == []  # above ln 27 = 3.30, a uniform guess's: a fit that blew up, not the labels
    assert judged(2.7, 4.0, 2.5) == []  # std 4: 2.5 standard errors are 0.316 nats, above the gap of 0.2
    assert judged(2.7, 1.0, 2.5, dropout=True) == []  # dropout raises the training loss by design
    assert judged(2.7, 1.0, None) == []  # no validation loss logged
    assert judged(2.4, 1.0, 2.5) == []  # below the validation loss: a model that fits what it trains on
    # a well-fit majority and 15 % worse than uniform as well: the validation loss says where (the source) first
    assert [f.action.kind for f in judged(2.7, 1.0, 2.5, good=600)] == ["label_source"]
    assert [f.action.kind for f in judged(2.4, 1.0, 2.5, good=600)] == ["clean_labels"]  # the examples' route alone


class Uncertain(L.LightningModule):
    """Ten classes drawn from a softmax of a random linear map (no well-fit majority), validated on clean labels."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Dropout(dropout), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def uncertain_data(n: int, noisy: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8, generator=g)
    logits = 0.5 * x @ torch.randn(8, 10, generator=torch.Generator().manual_seed(1))  # the same task in all splits
    y = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    if noisy:  # 40 % of the labels shuffled, as the fault zoo's operator
        wrong = torch.rand(n, generator=g) < 0.4
        y[wrong] = y[wrong][torch.randperm(int(wrong.sum()), generator=g)]
    return x, y


@pytest.mark.parametrize(("noisy", "dropout", "found"), [(False, 0.0, False), (True, 0.0, True), (True, 0.5, False)])
def test_wrong_labels_of_an_uncertain_task_are_found_from_the_validation_loss(tmp_path, noisy, dropout, found):
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(*uncertain_data(4000, noisy, g))
    val = torch.utils.data.TensorDataset(*uncertain_data(2000, False, g))
    monitor = HealthMonitor(every_n_steps=5, report=False, warn=False)
    data = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=g)
    model = Uncertain(dropout)
    trainer = L.Trainer(
        max_steps=500, logger=CSVLogger(tmp_path), callbacks=[monitor], accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, check_val_every_n_epoch=None, val_check_interval=500,
        num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data, torch.utils.data.DataLoader(val, batch_size=2000))
    labels = [f for f in monitor.findings if f.key == "data/labels"]
    assert [f.action.kind for f in labels] == (["label_source"] if found else [])
    if found:
        logged = trainer.callback_metrics["val_loss"].item()  # what the module logged, read back from Lightning
        assert f"{logged:.3f} (`val_loss`)" in labels[0].message and "at step 500" in labels[0].message


class Concluded(Judge):
    """Keeps the validation readout its conclusion is given (asked only when there is one)."""

    reads = ("validation",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def conclude(self, step, readouts):
        self.seen.append(readouts["validation"])
        return []


@pytest.mark.parametrize(
    ("key", "interval", "expected"), [("val/loss", 5, 10), ("val_loss", 50, None), ("acc", 5, None)]
)
def test_the_validation_probe_reads_the_logged_loss_of_the_last_validation_run(tmp_path, key, interval, expected):
    """train.py logs `val/loss`: the last of the runs at steps 5 and 10 (the end) is read; the sanity check
    (interval 50: the only validation of a 10-step fit) is not, nor a metric under another name."""
    from callbacks.probes.validation import ValidationProbe

    class Validated(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log(key, F.cross_entropy(self.net(x), y))

    judge = Concluded()
    model = Validated("logits to cross_entropy")
    trainer = L.Trainer(
        max_steps=10, logger=CSVLogger(tmp_path), callbacks=[Monitor(ValidationProbe(), [judge], warn=False)],
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        check_val_every_n_epoch=None, val_check_interval=interval, num_sanity_val_steps=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(), loader())
    if expected is None:
        assert judge.seen == []
        return
    (v,) = judge.seen
    x, y = loader().dataset.tensors  # the mean of the four batches' losses, by hand, with the final weights
    with torch.no_grad():
        by_hand = torch.stack(
            [F.cross_entropy(model.net(x[i : i + BATCH]), y[i : i + BATCH]) for i in range(0, 64, 16)]
        )
    assert (v.step, v.key) == (expected, key)
    assert v.value == pytest.approx(by_hand.mean().item(), rel=1e-5)
