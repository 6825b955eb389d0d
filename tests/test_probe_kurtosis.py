"""The kurtosis probe (a probe with declared states of its own: power sums and a max) against the moments of the
tensors computed directly, over two micro-batches a step, on a recorder of its own and through the logger."""

import math
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from callbacks._cadence import Cadence
from callbacks._recorder import Part, Recorder
from callbacks.judges.base import Judge
from callbacks.probes.kurtosis import KurtosisProbe, moments
from tests.callbacks_helpers import TanhMLP, fixed_loader, saturating_batch, trainer


class Keep(Judge):
    reads = ("activation_kurtosis",)

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, Any] = {}

    def observe(self, step: int, readouts: Any) -> list:
        self.seen[step] = readouts["activation_kurtosis"]
        return []


def _reference(y: torch.Tensor) -> tuple[float, float, float]:
    """(kurtosis, skewness, max |y|) of ``y``'s values, with population moments, in float64."""
    y = y.double().reshape(-1)
    c = y - y.mean()
    var = (c**2).mean()
    return ((c**4).mean() / var**2).item(), ((c**3).mean() / var**1.5).item(), y.abs().max().item()


def test_moments_by_hand():
    # the values -1, 0, 0, 1: mean 0, var 1/2, E[y^4] 1/2: kurtosis 2, skewness 0
    assert moments(4, 0.0, 2.0, 0.0, 2.0) == (2.0, 0.0)
    assert all(math.isnan(v) for v in moments(1, 1.0, 1.0, 1.0, 1.0))  # one value: undefined
    assert all(math.isnan(v) for v in moments(3, 6.0, 12.0, 24.0, 48.0))  # three equal values: no variance


def test_kurtosis_of_each_layer_against_the_tensors(tmp_path):
    keep = Keep()
    probe = KurtosisProbe(cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0))
    outputs: dict[int, dict[str, list[torch.Tensor]]] = {}

    class Reference(Callback):
        def on_train_batch_end(self, trainer, pl_module, out, batch, batch_idx) -> None:
            step = outputs.setdefault(batch_idx // 2, {"act": [], "relu": []})  # 2 micro-batches a step
            step["act"].append(pl_module.h.detach().clone())
            step["relu"].append(pl_module.r)

    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    recorder = Recorder([Part("KurtosisProbe", [probe], [keep])])
    t = trainer(tmp_path, [recorder, Reference()], logger=logger, max_steps=4, accumulate_grad_batches=2)
    model = TanhMLP()
    x = saturating_batch()
    x[:, 3] *= torch.linspace(0.1, 8.0, len(x))  # heavier tails in one feature: a kurtosis above the uniform's
    t.fit(model, fixed_loader(x, 8, batch_size=8))  # each step: two different micro-batches of 8
    assert sorted(keep.seen) == [0, 1, 3]
    for step, readout in keep.seen.items():
        layers = {layer.name: layer for layer in readout.layers}
        assert sorted(layers) == ["act", "relu"]  # `unused` (a Sigmoid never called) has no entry
        for name in ("act", "relu"):
            y = torch.cat(outputs[step][name])  # (16, 8): both micro-batches
            kurtosis, skewness, peak = _reference(y)
            layer = layers[name]
            assert layer.count == y.numel()
            assert layer.kurtosis == pytest.approx(kurtosis, rel=1e-9)
            assert layer.skewness == pytest.approx(skewness, rel=1e-9, abs=1e-12)
            assert layer.peak == pytest.approx(peak, rel=1e-12)
    # through the logger: the last recorded step's kurtosis of the tanh
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = {
        int(float(r[header.index("step")])): float(r[header.index("activation_kurtosis/act")])
        for r in (row.split(",") for row in rows[1:])
        if r[header.index("activation_kurtosis/act")]
    }
    assert logged[3] == pytest.approx(_reference(torch.cat(outputs[3]["act"]))[0], rel=1e-9)
    columns, table = probe.rows()
    assert columns[:2] == ["layer", "kurtosis"] and [row[0] for row in table] == ["act (Tanh)", "relu (ReLU)"]


def test_bad_modules_say_what_to_pass():
    with pytest.raises(ValueError, match=r"Expected `modules` to hold `nn\.Module` subclasses or name patterns"):
        KurtosisProbe(modules=[3])  # type: ignore[list-item]


class _Broken(KurtosisProbe):
    """Replaces a declared state by a number instead of accumulating into it."""

    def end_step(self, rec: Any, outputs: Any) -> None:
        self.peak = 3.0  # type: ignore[assignment]


def test_a_state_that_is_no_longer_a_tensor_stops_the_fit_with_its_fix(tmp_path):
    # one process on the CPU keeps the states where they are (nothing to reduce), and still checks them
    recorder = Recorder([Part("KurtosisProbe", [_Broken(cadence=Cadence(every_n_steps=1))], [])])
    t = trainer(tmp_path, [recorder], logger=CSVLogger(str(tmp_path), name="csv"), max_steps=2)
    expected = r"Expected `_Broken\.peak` to be a tensor of shape \(3,\).*`self\.peak \+= x`"
    with pytest.raises(ValueError, match=expected):
        t.fit(TanhMLP(), fixed_loader(saturating_batch(), 8, batch_size=8))
