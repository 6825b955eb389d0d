"""The activation monitors on models nobody here wrote: a Hugging Face GPT-2 and a user's ``Swish`` MLP.

Each model is trained a few steps through Lightning with ``ActivationMonitor`` and ``GradientMonitor`` writing to
TensorBoard; the event files are read back and compared with statistics computed by plain forward/tensor hooks on
an identical twin (same seed, same batches, same SGD steps) trained in a plain PyTorch loop.
"""

from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ActivationMonitor, GradientMonitor, _activation_kinds, _selection
from tests.callbacks_helpers import histograms, read_events, scalars, trainer

LR = 0.1
STEPS = 3
BATCH, SEQ = 4, 16


class Wrapper(L.LightningModule):
    """Any network behind a loss function: the LightningModule a practitioner would write around it."""

    def __init__(self, net: nn.Module, loss: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = net
        self.loss = loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(self.model, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def reference_stats(
    net: nn.Module, loss: Callable[[nn.Module, Any], Tensor], loader: DataLoader, names: list[str], steps: int
) -> list[dict[str, dict[str, float]]]:
    """Per step, per watched module: the output's statistics and its gradient's std, from plain hooks."""
    modules = dict(net.named_modules())
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    outputs: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Tensor) -> None:
            outputs[name] = out.detach().clone()
            out.register_hook(lambda g: grads.__setitem__(name, g.clone()))

        return hook

    rows = []
    for _, batch in zip(range(steps), loader, strict=False):
        outputs.clear()
        grads.clear()
        handles = [modules[name].register_forward_hook(recorder(name)) for name in names]
        opt.zero_grad()
        loss(net, batch).backward()
        opt.step()
        for h in handles:
            h.remove()
        rows.append(
            {
                name: {
                    "mean": outputs[name].mean().item(),
                    "std": outputs[name].std().item(),
                    "count": outputs[name].numel(),
                    "dead": (~(outputs[name] > 0).any(0)).float().mean().item(),  # units never positive in the batch
                    "saturated": (outputs[name].abs() > 0.97).float().mean().item(),
                    "grad_std": grads[name].std().item(),
                }
                for name in names
            }
        )
    return rows


def fit_and_read(tmp_path, module: L.LightningModule, loader: DataLoader):
    monitors = [
        ActivationMonitor(every_n_steps=1, histogram_every_n_steps=1, warn=False),
        GradientMonitor(every_n_steps=1, histogram_every_n_steps=1, warn=False),
    ]
    t = trainer(tmp_path, monitors, max_steps=STEPS, log_every_n_steps=1, limit_val_batches=0)
    t.fit(module, loader)
    return read_events(t.logger.log_dir)


def by_step(values: dict[int, Any]) -> list[Any]:
    """The logged values in step order (the test relies on every step being logged, not on the step numbering)."""
    return [values[s] for s in sorted(values)]


# ---------------------------------------------------------------------------------------------- GPT-2
def gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=50,
        n_positions=SEQ,
        resid_pdrop=0.0,  # no dropout: the twin's forward is the same computation, not the same random draw
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def lm_loss(net: nn.Module, batch: Any) -> Tensor:
    (ids,) = batch
    return net(input_ids=ids, labels=ids).loss


def token_loader() -> DataLoader:
    ids = torch.randint(0, 50, (BATCH * STEPS, SEQ), generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(ids), batch_size=BATCH)


def test_gpt2_activations_match_a_plain_twin(tmp_path):
    net = gpt2()
    watched = [f"transformer.h.{i}.mlp.act" for i in range(2)]
    assert [type(m).__name__ for n, m in net.named_modules() if n in watched] == ["NewGELUActivation"] * 2
    assert [n for n, _ in _selection.select_modules(net, None)] == watched  # by type, found by default

    acc = fit_and_read(tmp_path, Wrapper(net, lm_loss), token_loader())
    ref = reference_stats(gpt2(), lm_loss, token_loader(), watched, STEPS)
    tags = acc.Tags()

    for name in watched:
        tag = f"activation/model.{name}"
        assert f"{tag}/saturation" not in tags["scalars"]  # GELU-like: dead units, not saturation
        for key, rel in (("mean", 1e-4), ("std", 1e-5), ("dead", 0)):
            logged = by_step(scalars(acc, f"{tag}/{key}"))
            assert logged == pytest.approx([r[name][key] for r in ref], rel=rel, abs=1e-6), key
        hist = by_step(histograms(acc, tag))
        assert [h.num for h in hist] == [r[name]["count"] for r in ref] == [BATCH * SEQ * 4 * 32] * STEPS
        assert sum(hist[0].bucket) == hist[0].num
        assert [h.sum / h.num for h in hist] == pytest.approx([r[name]["mean"] for r in ref], rel=1e-4, abs=1e-6)
        grad_std = by_step(scalars(acc, f"activation_grad/model.{name}/std"))
        assert grad_std == pytest.approx([r[name]["grad_std"] for r in ref], rel=1e-4)
    # nothing else is watched: the Conv1D, LayerNorm and Dropout modules are not activations
    watched_tags = {t.rsplit("/", 1)[0] for t in tags["scalars"] if t.startswith("activation/")}
    assert watched_tags == {f"activation/model.{n}" for n in watched}


# ---------------------------------------------------------------------------------------------- user classes
class Swish(nn.Module):
    """A user's activation: recognised by its class name (a leaf module called like an activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class Squash(nn.Module):
    """A user's bounded activation under a name no rule knows: the test registers it."""

    def forward(self, x: Tensor) -> Tensor:
        return x / (1 + x.abs())  # in (-1, 1)


def swish_mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), Swish(), nn.Linear(16, 16), Squash(), nn.Linear(16, 3))
    with torch.no_grad():
        net[0].bias[:4] = -100.0  # 4 of 16 units are never positive: dead
        net[2].bias[:4] = 100.0  # 4 of 16 Squash outputs near 100 / 101: saturated
    return net


def class_loss(net: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def feature_loader() -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(16 * STEPS, 8, generator=g), torch.arange(16 * STEPS) % 3), 16)


def test_user_swish_and_registered_class_match_a_plain_twin(tmp_path, monkeypatch):
    monkeypatch.setattr(_activation_kinds, "_REGISTRY", {})
    _activation_kinds.register_activation(Squash, kind="bounded", range=(-1.0, 1.0))
    acc = fit_and_read(tmp_path, Wrapper(swish_mlp(), class_loss), feature_loader())
    ref = reference_stats(swish_mlp(), class_loss, feature_loader(), ["1", "3"], STEPS)
    tags = acc.Tags()["scalars"]

    # Swish: ReLU-like by its name; 4 of 16 units dead by construction
    assert "activation/model.1/saturation" not in tags
    dead = by_step(scalars(acc, "activation/model.1/dead"))
    assert dead == pytest.approx([r["1"]["dead"] for r in ref], abs=1e-7)
    assert all(d >= 4 / 16 for d in dead)
    # Squash: bounded by registration; saturation is the share with |y| > 0.97
    assert "activation/model.3/dead" not in tags
    sat = by_step(scalars(acc, "activation/model.3/saturation"))
    assert sat == pytest.approx([r["3"]["saturated"] for r in ref], abs=1e-7)
    assert all(s >= 4 / 16 for s in sat)
    for name in ("1", "3"):
        for key in ("mean", "std"):
            logged = by_step(scalars(acc, f"activation/model.{name}/{key}"))
            assert logged == pytest.approx([r[name][key] for r in ref], rel=1e-5, abs=1e-6)
        grad_std = by_step(scalars(acc, f"activation_grad/model.{name}/std"))
        assert grad_std == pytest.approx([r[name]["grad_std"] for r in ref], rel=1e-4)
        assert [h.num for h in by_step(histograms(acc, f"activation/model.{name}"))] == [16 * 16] * STEPS
