"""configs/lecture/*.yaml build the nets of the lecture's loss table (../shared/LECTURE.md).

Each config goes through train.py's own parser, then its net is checked at step 0 against the lecture:
loss on 4,096 training examples in train mode, and the share of tanh outputs with |h| > 0.97 (read with
forward hooks on the Tanh modules, not through the model's own helpers).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_makemore.cli import MakemoreCLI
from lightning_makemore.data import NamesDataModule
from lightning_makemore.module import MakemoreModule

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ROOT / "configs" / "lecture"
LN_VOCAB = math.log(27)  # 3.2958: the loss of a uniform prediction over 27 characters

# stage -> (step-0 loss check, (min, max) share of |h| > 0.97, parameter count)
EXPECTED = {
    "original": ("> 10", (0.65, 0.75), 11_897),  # lecture: 27.88 on its batch of 32, ~70 % saturated
    "softmax_fix": ("ln 27", (0.65, 0.75), 11_897),  # ~3.32, still ~70 % saturated
    "tanh_fix": ("ln 27", (0.03, 0.08), 11_897),  # ~5 %
    "kaiming": ("ln 27", (0.17, 0.22), 11_897),  # 18-21 %
    "batchnorm": ("ln 27", (0.02, 0.05), 12_097),  # ~3 %; 200 gammas + 200 betas replace b1
    "deep": ("ln 27", (0.02, 0.05), 47_024),  # the lecture's count for the deep net
}


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def init_batch(names_dm: NamesDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    X, Y = names_dm.splits["train"]
    ix = torch.randint(0, len(X), (4096,), generator=torch.Generator().manual_seed(0))
    return X[ix], Y[ix]


def test_every_stage_has_a_config():
    assert sorted(p.stem for p in LECTURE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize(
    "path", [*sorted(LECTURE.glob("*.yaml")), ROOT / "configs" / "best.yaml"], ids=lambda p: p.stem
)
def test_config_parses_with_train_py(path: Path, monkeypatch, small_corpus):
    """`python train.py fit --config <path>` would accept it, and sees the values the file holds."""
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI warns when pytest's own arguments are there
    cli = MakemoreCLI(
        MakemoreModule,
        NamesDataModule,
        run=False,
        args=[
            *("--config", str(path), "--data.path", str(small_corpus), "--monitors", "false"),
            *("--trainer.logger", "false", "--seed_everything", "false"),
        ],
    )
    config = load(path)
    for key, value in config["model"].items():
        assert cli.model.hparams[key] == value, key
    for key, value in config["data"].items():
        assert getattr(cli.datamodule, key) == value, key
    assert cli.trainer.max_steps == config["trainer"]["max_steps"]


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_is_trained_the_lectures_way(stage: str):
    config = load(LECTURE / f"{stage}.yaml")
    model, data = config["model"], config["data"]
    assert (model["optimizer"], model["lr"], model["schedule"], model["lr_decay_factor"]) == ("sgd", 0.1, "step", 0.1)
    assert model["lr_decay_at"] == (0.75 if stage == "deep" else 0.5)  # step 150,000 vs 100,000
    assert (data["block_size"], data["batch_size"], data["sampling"]) == (3, 32, "random")
    assert config["trainer"]["max_steps"] == 200_000
    assert model["n_embd"] == 10 and model["n_hidden"] == (100 if stage == "deep" else 200)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_init_matches_the_lecture(stage: str, names_dm: NamesDataModule, init_batch):
    loss_check, (sat_lo, sat_hi), n_params = EXPECTED[stage]
    model = MakemoreModule(vocab=list(names_dm.vocab.itos), block_size=3, **load(LECTURE / f"{stage}.yaml")["model"])
    net = model.net.train()  # step 0: BatchNorm normalises with the batch's own statistics
    outputs: list[torch.Tensor] = []
    tanhs = [m for m in net.modules() if isinstance(m, torch.nn.Tanh)]
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in tanhs]
    x, y = init_batch
    with torch.no_grad():
        loss = F.cross_entropy(net(x), y).item()
    for handle in handles:
        handle.remove()

    assert len(tanhs) == (5 if stage == "deep" else 1)
    if loss_check == "> 10":
        assert loss > 10, f"the original net should start confidently wrong, but got loss {loss:.2f}"
    else:
        assert abs(loss - LN_VOCAB) < 0.05, f"Expected loss near ln 27 = {LN_VOCAB:.4f}, but got {loss:.4f}"
    for i, h in enumerate(outputs, start=1):
        saturated = (h.abs() > 0.97).float().mean().item()
        assert sat_lo <= saturated <= sat_hi, (
            f"layer {i}: {saturated:.1%} saturated, expected {sat_lo:.0%}-{sat_hi:.0%}"
        )
    assert sum(p.numel() for p in net.parameters()) == n_params
