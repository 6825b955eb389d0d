"""The output-logit probe (log Z and the logits' range) against the logits themselves, and the Adam-ε probe against
the optimizer's state worked through by hand (Adam and AdamW, foreach and fused, amsgrad), through a fit."""

from typing import Any

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from callbacks._cadence import Cadence
from callbacks._recorder import Part, Recorder
from callbacks.judges.base import Judge
from callbacks.probes import adam as adam_probe
from callbacks.probes.adam import AdamEpsProbe
from callbacks.probes.logits import OutputLogitsProbe
from tests.callbacks_helpers import trainer


class Keep(Judge):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.reads = (prefix,)
        self.seen: dict[int, Any] = {}

    def observe(self, step: int, readouts: Any) -> list:
        self.seen[step] = readouts[self.reads[0]]
        return []


class Net(L.LightningModule):
    def __init__(self, optimizer: str = "adamw", **opt: Any) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 7)
        self.optimizer, self.opt = optimizer, opt
        self.logits: list[Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (idx,) = batch
        logits = self.head(torch.tanh(self.hidden(self.emb(idx[:, :-1])))) * 3.0  # (B, T, 7)
        self.logits.append(logits.detach().clone())
        return F.cross_entropy(logits.reshape(-1, 7), idx[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer]
        return cls(self.parameters(), lr=1e-2, **self.opt)


def _fit(tmp_path, model: L.LightningModule, probe: Any, extra: list[Callback] | None = None, steps: int = 4) -> Keep:
    keep = Keep(probe.prefix)
    recorder = Recorder([Part(type(probe).__name__, [probe], [keep])])
    t = trainer(
        tmp_path, [recorder, *(extra or [])], logger=CSVLogger(str(tmp_path)), max_steps=steps, log_every_n_steps=2
    )
    torch.manual_seed(0)
    idx = torch.randint(0, 7, (4 * steps, 6))
    t.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(idx), batch_size=4))
    return keep


def test_output_logits_against_the_logits(tmp_path):
    torch.manual_seed(0)
    model = Net()
    keep = _fit(tmp_path, model, OutputLogitsProbe(cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0)))
    assert sorted(keep.seen) == [0, 1, 3]
    for step, r in keep.seen.items():
        logits = model.logits[step].double()  # the step's logits, as training_step computed them
        z = torch.logsumexp(logits, -1).reshape(-1)
        assert r.layer == "head (Linear)" and r.rows == z.numel()
        # the head's output is the logits / 3: the probe reads the output layer, not the loss's input
        z_head = torch.logsumexp(logits / 3.0, -1).reshape(-1)
        assert r.log_z_mean == pytest.approx(z_head.mean().item(), rel=1e-6)
        assert (r.log_z_min, r.log_z_max) == pytest.approx((z_head.min().item(), z_head.max().item()), rel=1e-6)
        assert (r.logit_min, r.logit_max) == pytest.approx(((logits / 3).min().item(), (logits / 3).max().item()))
        spread = ((logits / 3).amax(-1) - (logits / 3).amin(-1)).mean().item()
        assert r.spread == pytest.approx(spread, rel=1e-6)
        del z


def test_output_layer_named_or_wrong(tmp_path):
    probe = OutputLogitsProbe(layer="hidden", cadence=Cadence(every_n_steps=2, histogram_every_n_steps=0))
    keep = _fit(tmp_path, Net(), probe, steps=1)
    assert keep.seen[0].layer == "hidden (Linear)"
    with pytest.raises(ValueError, match="Expected `layer` to be None or a module name"):
        OutputLogitsProbe(layer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected `layer` to name a module of Net, but got 'nope'"):
        _fit(tmp_path, Net(), OutputLogitsProbe(layer="nope"), steps=1)


class StateAfterStep(Callback):
    """The test's own reading of Adam's state after each step: the formula worked through by hand."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, tuple[float, float, float, float, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        group = opt.param_groups[0]
        (b1, b2), eps = group["betas"], group["eps"]
        out = {}
        for name, p in pl_module.named_parameters():
            st = opt.state[p]
            t = float(st["step"])
            v = (st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]).double() / (1 - b2**t)
            m = st["exp_avg"].double() / (1 - b1**t)
            root = v.sqrt()
            u = m / (root + eps)
            out[name] = (
                (root < eps).double().mean().item(),
                (eps / (root + eps)).mean().item(),
                root.square().mean().sqrt().item(),
                u.square().mean().sqrt().item(),
                eps,
            )
        self.by_step[trainer.global_step - 1] = out


@pytest.mark.parametrize(
    "optimizer, opt",
    [
        ("adamw", {}),
        ("adam", {"foreach": True, "eps": 1e-3}),
        ("adamw", {"fused": True, "amsgrad": True, "eps": 1.0}),  # eps far above sqrt(v): it dominates
    ],
)
@pytest.mark.parametrize("batch", [None, 7], ids=["one_batch", "split_chunks"])
def test_adam_eps_against_the_state(tmp_path, optimizer, opt, batch, monkeypatch):
    if batch is not None:  # every parameter split into chunks of 7 elements, batches flushed mid-parameter
        monkeypatch.setattr(adam_probe, "BATCH", batch)
    torch.manual_seed(0)
    ref = StateAfterStep()
    keep = _fit(tmp_path, Net(optimizer, **opt), AdamEpsProbe(Cadence(2, 0)), [ref])
    assert sorted(keep.seen) == [0, 1, 3]
    for step, readout in keep.seen.items():
        assert [p.name for p in readout.params] == [
            "emb.weight",
            "hidden.weight",
            "hidden.bias",
            "head.weight",
            "head.bias",
        ]
        for p in readout.params:
            dominated, shrink, root, update, eps = ref.by_step[step][p.name]
            assert p.eps == eps
            assert p.dominated == pytest.approx(dominated, abs=1e-12)
            assert (p.shrink, p.sqrt_v_rms, p.update_rms) == pytest.approx((shrink, root, update), rel=1e-9)
    if opt.get("eps") == 1.0:
        # every element: eps dominates; the update is a fraction of the healthy twin's (below)
        assert all(p.dominated == 1.0 and p.shrink > 0.5 for p in keep.seen[3].params)
    elif "eps" not in opt:
        assert all(p.dominated == 0.0 and p.shrink < 1e-3 for p in keep.seen[3].params)


def test_adam_eps_silent_without_adam(tmp_path):
    keep = _fit(tmp_path, Net("sgd"), AdamEpsProbe(Cadence(2, 0)), steps=2)
    assert all(r is None for r in keep.seen.values())  # SGD: nothing to read
