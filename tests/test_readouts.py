"""Typed readouts (``callbacks.judges.base.Readouts``): a judge names the readout classes it reads and gets each as
that class, from hand-made readouts and from the recorder in a real fit; a readout class that does not match its
probe cannot be read by mistake."""

import importlib
import pkgutil
import typing
from dataclasses import dataclass
from typing import ClassVar

import pytest
from lightning.pytorch.callbacks import Callback

import callbacks.probes
from callbacks._cadence import Cadence
from callbacks._recorder import Part
from callbacks._recorder import Recorder as Monitors
from callbacks.judges.base import Finding, Judge, Readouts, prefix_of
from callbacks.judges.init import InitCheck
from callbacks.probes.activation import ActivationProbe, Activations
from callbacks.probes.attention import Attention
from callbacks.probes.base import Probe
from callbacks.probes.logits import OutputLogits
from callbacks.probes.loss import Loss, LossProbe
from tests.callbacks_helpers import Recorder, TanhMLP, fixed_loader, saturating_batch, trainer


# ---------------------------------------------------------------------------------------- hand-made readouts
def test_typed_access_by_class_and_the_same_readout_by_prefix():
    loss = Loss(3, 2.5, 27, "given")
    readouts = Readouts.of(loss, Activations(3, []))
    assert readouts[Loss] is loss and readouts["loss"] is loss  # the class or its probe's prefix
    assert readouts.get(Loss) is loss and readouts.get(Attention) is None
    assert Loss in readouts and "loss" in readouts and Attention not in readouts and "attention" not in readouts
    assert sorted(readouts) == ["activation", "loss"] and len(readouts) == 2
    assert dict(readouts) == {"loss": loss, "activation": Activations(3, [])}  # still a Mapping[str, Any]
    assert Readouts({"loss": loss}) == {"loss": loss}  # made from a prefix -> readout mapping (the recorder's)


def test_a_probe_that_read_nothing_is_none_to_get_and_an_error_to_index():
    readouts = Readouts({"logits": None})  # the logits probe found no output layer
    assert readouts.get(OutputLogits) is None and readouts.get(OutputLogits, "absent") == "absent"
    with pytest.raises(TypeError, match=r"got NoneType: its probe had nothing to read; use `readouts.get\(Output"):
        readouts[OutputLogits]


def test_a_readout_cannot_be_read_as_another_class():
    @dataclass
    class Impostor:  # declares the loss probe's prefix, but is not what that probe reads
        prefix: ClassVar[str] = "loss"
        value: float

    readouts = Readouts.of(Loss(0, 3.3, 27, "given"))
    with pytest.raises(TypeError, match=r"Expected the `loss` readout to be a .*Impostor, but got Loss"):
        readouts[Impostor]
    with pytest.raises(TypeError, match="`int` has no `prefix`"):
        readouts[int]
    with pytest.raises(KeyError, match="no `activation` readout on this step"):
        readouts[Activations]


def test_reads_by_class_or_by_prefix_name_the_same_probes():
    class Both(Judge):
        reads = (Loss, "activation")

    both = Both()
    assert both.prefixes == ("loss", "activation")
    both.reads = (Attention,)  # replaced on the instance: the prefixes follow (they are kept between steps)
    assert both.prefixes == ("attention",)
    assert InitCheck().prefixes == ("loss",)
    assert prefix_of(Attention) == "attention" and prefix_of("trace") == "trace"


def _probe_classes() -> list[type[Probe]]:
    for info in pkgutil.iter_modules(callbacks.probes.__path__):
        importlib.import_module(f"callbacks.probes.{info.name}")
    found, todo = [], list(Probe.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("callbacks.probes."):
            found.append(cls)
    return found


def test_every_probes_readout_class_declares_that_probes_prefix():
    checked = {}
    for cls in _probe_classes():
        returned = typing.get_type_hints(cls.read)["return"]
        readouts = [t for t in typing.get_args(returned) if t is not type(None)] or [returned]
        assert len(readouts) == 1, (cls, returned)
        assert readouts[0].prefix == cls.prefix, (cls, readouts[0])
        checked[cls.prefix] = readouts[0].__name__
    assert checked["activation"] == "Activations" and checked["logits"] == "OutputLogits" and len(checked) >= 10


# ---------------------------------------------------------------------------------------- from the recorder
class Typed(Judge):
    """Keeps the typed readouts it is given (a finding on step 0, to follow it to the record)."""

    reads = (Loss, Activations)

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[Loss, Activations]] = {}
        self.concluded: tuple[int, Loss] | None = None

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        self.seen[step] = (readouts[Loss], readouts[Activations])
        return [Finding("typed/loss", step, "", f"loss {readouts[Loss].value:.4f}")] if step == 0 else []

    def conclude(self, step: int, readouts: Readouts) -> list[Finding]:
        self.concluded = (step, readouts[Loss])
        return []


class Asked(Judge):
    """Counts the steps it is asked on (``reads`` set per instance)."""

    def __init__(self, *reads: type | str) -> None:
        super().__init__()
        self.reads = reads
        self.steps: list[int] = []

    def observe(self, step: int, readouts: Readouts) -> list[Finding]:
        self.steps.append(step)
        return []


def test_a_judge_reads_typed_readouts_from_the_recorder_in_a_fit(tmp_path):
    typed, mixed, absent = Typed(), Asked("loss", Activations), Asked(Attention)
    probes = [LossProbe(Cadence(every_n_steps=2)), ActivationProbe(None, Cadence(every_n_steps=2), 20, 0.97)]
    monitors = Monitors([Part("Typed", probes, [typed, mixed, absent], warn=False)])
    reference = Recorder(lr=0.1)  # the activations' statistics computed from the tensors
    losses: dict[int, float] = {}

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses[trainer.global_step - 1] = outputs["loss"].item()

    t = trainer(tmp_path, [monitors, reference, Losses()], max_steps=5, log_every_n_steps=2)
    t.fit(TanhMLP(), fixed_loader(saturating_batch(), 5))
    assert sorted(typed.seen) == [0, 1, 3] == mixed.steps  # step 0, then every 2 steps: by class or by prefix
    assert absent.steps == []  # no probe gives Attention: never asked
    for step, (loss, acts) in typed.seen.items():
        assert isinstance(loss, Loss) and isinstance(acts, Activations) and loss.step == acts.step == step
        assert loss.value == pytest.approx(losses[step], rel=1e-6)
        layers = {layer.name: layer for layer in acts.layers}
        assert layers["act"].saturation == pytest.approx(reference.rows[step]["act_saturation"])  # 25 %
        assert layers["relu"].dead == pytest.approx(reference.rows[step]["relu_dead"])  # 2 of 8 units
    assert typed.concluded is not None and typed.concluded[0] == 4 and typed.concluded[1].step == 3
    (finding,) = monitors.parts[0].record.findings
    assert finding.key == "typed/loss" and finding.message == f"loss {losses[0]:.4f}"
