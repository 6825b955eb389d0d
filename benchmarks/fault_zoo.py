"""The fault zoo: healthy base models, mutants made by fault operators, and what the health report and its fixes do.

Base models (each over several seeds, trained with SGD or AdamW on CPU for a few hundred to a few thousand steps):

- ``names-mlp``: the lecture's MLP (Kaiming tanh, BatchNorm) on the names, context 3;
- ``names-deep``: the lecture's deep net (4 x 100 tanh, BatchNorm);
- ``blobs-mlp``: an MLP (2 tanh layers) on scikit-learn's ``make_blobs`` (AutoTrainer's toy problems);
- ``digits-cnn``: a small CNN (two 3x3 convs, ReLU) on scikit-learn's bundled ``load_digits`` (8x8, no download);
- ``names-gpt``: the small GPT of ``benchmarks/bench_monitors.py`` (2 blocks, untied head), next character from 8.

Mutants: DeepCrime's operators (Humbatova et al., ISSTA 2021) and AutoTrainer's five training problems (vanishing
and exploding gradients, dying ReLU, oscillating loss, slow convergence): the learning rate x10, x100 and / 100;
a hidden layer's weights zeroed, x10 (too large), x0.1 (too small); the init without the activation's gain; the
activations swapped for sigmoid; normalisation removed; the inputs left unnormalised; a softmax before the
cross-entropy; a layer frozen; 40 % of the labels shuffled; batch size 2. Ground truth: the operator and the layer
it touched. A mutant is **sick** when its val loss is worse than its base's mean by more than the base's seed
noise (2 x the std over seeds, at least 0.01); the others are equivalent mutants (reported, not scored for recall).

Scores: a run is **flagged** when its health report has a problem finding; precision = sick flagged / all flagged
among sick mutants and healthy bases; recall = sick flagged / sick; right layer = flagged sick mutants with a known
layer whose findings name it (or its block); heal = sick mutants the repair loop (the report's generic actions,
``callbacks.fixes``, and the ones a user applies by changing the model or the data: the activation, the logits to
the loss, the batch size, the inputs standardised, the training examples whose label its sick model does not
predict dropped (the label issues), the training labels fixed at their source when the report says that they, not
the validation labels, are wrong (the mutant built without its shuffle, as a user who finds the damage would: as
for the softmax before the loss; the scores also give the heal rate without that edit); applied to a refit of the
same seed and budget, each round all together and each alone, the best kept only when the val loss improves by
more than the noise, 3 rounds at most) leaves within noise of their base; harmful = kept changes that made a model
worse (never kept by construction; the rejected ones are counted); fixes proposed on healthy bases; compute = the
loop's training time (the sick run and every round) over the sick run's.

The Transformer sweep's 50 runs (``benchmarks/transformer_sweep.py``) are folded into precision and recall: sick when
worse than their variant's best learning rate beyond twice the seed noise (``--transformer``: its committed
``transformer_sweep.json`` by default, ``run`` to run it, ``none``).

``python benchmarks/fault_zoo.py`` writes ``benchmarks/results/fault_zoo.{md,json}``; ``--quick`` is the CI slice
(tests/test_fault_zoo.py); ``--rescore benchmarks/results/fault_zoo.json`` scores the stored runs again, no training.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import HealthMonitor
from callbacks.fixes import ApplyFixes, actions_of, applicable
from callbacks.judges.base import Action, Finding

RESULTS = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------------------ data
Data = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train, y_train, x_val, y_val


def blobs() -> Data:
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=3000, centers=6, n_features=8, cluster_std=3.0, random_state=0)
    x = (x - x.mean(0)) / x.std(0)  # normalised inputs (the "unnormalised" operator undoes this)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return x[:2000], y[:2000], x[2000:], y[2000:]


def digits() -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return x[:1300], y[:1300], x[1300:], y[1300:]


def names(block_size: int) -> Data:
    from lightning_makemore.data import NamesDataModule

    dm = NamesDataModule(block_size=block_size)
    dm.setup("fit")
    (xt, yt), (xv, yv) = dm.splits["train"], dm.splits["val"]
    return xt, yt, xv[:20000], yv[:20000]


# ------------------------------------------------------------------------------------------------ models
class TanhMLP(nn.Module):
    """in -> [Linear -> (BatchNorm) -> act] x depth -> Linear; Kaiming init (gain of the activation)."""

    def __init__(self, n_in: int, n_out: int, width: int, depth: int, norm: bool, act: str = "tanh") -> None:
        super().__init__()
        acts = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU}
        layers: list[nn.Module] = []
        for i in range(depth):
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(n_in if i == 0 else width, width))
            if norm:
                block.add_module("bn", nn.BatchNorm1d(width))
            block.add_module("act", acts[act]())
            layers.append(block)
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_out)
        gain = {"tanh": 5 / 3, "relu": math.sqrt(2), "sigmoid": 1.0}[act]
        with torch.no_grad():
            for b in self.blocks:
                b.linear.weight.normal_(0, gain / math.sqrt(b.linear.in_features))
                b.linear.bias.zero_()
            self.head.weight.normal_(0, 0.1 / math.sqrt(width))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x.flatten(1)))


class NamesNet(nn.Module):
    """An embedding in front of a TanhMLP (the lecture's MLP: context of 3 characters, 10 dimensions each)."""

    def __init__(self, width: int, depth: int, norm: bool, act: str = "tanh") -> None:
        super().__init__()
        self.embedding = nn.Embedding(27, 10)
        self.mlp = TanhMLP(30, 27, width, depth, norm, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.embedding(x))


class SmallCNN(nn.Module):
    def __init__(self, norm: bool = True, act: str = "relu") -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16) if norm else nn.Identity()
        self.act1 = acts[act]()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32) if norm else nn.Identity()
        self.act2 = acts[act]()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


def gpt(norm: bool = True, act: str = "gelu") -> nn.Module:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported from the tests
    from bench_monitors import GPT, GPTConfig

    class NextChar(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = GPT(GPTConfig(vocab_size=27, block_size=8, n_layer=2, n_head=2, n_embd=32), tied=False)

        def forward(self, x: Tensor) -> Tensor:
            return self.gpt(x)[:, -1]  # the next character after the context: (B, 27)

    return NextChar()


@dataclass
class Base:
    name: str
    build: Callable[..., nn.Module]  # (norm, act) -> net
    data: Callable[[], Data]
    lr: float
    optimizer: str
    steps: int
    batch: int
    act: str
    norm: bool
    hidden: str  # the first hidden layer with weights (for the layer operators)
    float_inputs: bool = True


BASES = {
    "blobs-mlp": Base(
        "blobs-mlp", lambda norm, act: TanhMLP(8, 6, 64, 2, norm, act), blobs, 0.1, "sgd", 600, 32, "tanh", False,
        "blocks.1.linear",
    ),
    "digits-cnn": Base(
        "digits-cnn", lambda norm, act: SmallCNN(norm, act), digits, 0.05, "sgd", 600, 32, "relu", True, "conv2"
    ),
    "names-mlp": Base(
        "names-mlp", lambda norm, act: NamesNet(200, 1, norm, act), lambda: names(3), 0.1, "sgd", 2000, 32, "tanh",
        True, "mlp.blocks.0.linear", float_inputs=False,
    ),
    "names-deep": Base(
        "names-deep", lambda norm, act: NamesNet(100, 4, norm, act), lambda: names(3), 0.1, "sgd", 2000, 32, "tanh",
        True, "mlp.blocks.1.linear", float_inputs=False,
    ),
    "names-gpt": Base(
        "names-gpt", lambda norm, act: gpt(norm, act), lambda: names(8), 3e-3, "adamw", 800, 32, "gelu", True,
        "gpt.h.0.mlp.c_fc", float_inputs=False,
    ),
}  # fmt: skip

#: operator -> (what it does, whether it touches one layer)
OPERATORS = {
    "lr x10": "learning rate x10",
    "lr x100": "learning rate x100",
    "lr /100": "learning rate / 100",
    "zeros": "a hidden layer's weights zeroed",
    "large": "a hidden layer's weights x10",
    "small": "a hidden layer's weights x0.1",
    "no gain": "every hidden layer at std 1/sqrt(fan_in) (no activation gain)",
    "sigmoid": "the activations swapped for sigmoid",
    "no norm": "normalisation removed",
    "unnormalised": "inputs x50 + 20 (left unnormalised)",
    "softmax": "a softmax before the cross-entropy",
    "frozen": "a hidden layer frozen (requires_grad False)",
    "noisy labels": "40 % of the training labels shuffled",
    "batch 2": "batch size 2",
}
LAYER_OPS = ("zeros", "large", "small", "frozen")


# ------------------------------------------------------------------------------------------------ training
class Module(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float, optimizer: str, softmax: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.optimizer_name, self.softmax = net, lr, optimizer, softmax

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits.softmax(-1) if self.softmax else logits  # the mutant feeds probabilities to the loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))  # the mean over the batches (one here)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@dataclass
class Run:
    base: str
    seed: int
    operator: str  # "" for the base
    layer: str  # the layer the operator touched ("" when model-wide)
    val: float = math.nan
    seconds: float = 0.0
    problems: list[dict[str, str]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    sick: bool | None = None
    flagged: bool = False
    layer_right: bool | None = None
    healed: bool | None = None
    heal_rounds: list[dict[str, Any]] = field(default_factory=list)
    heal_seconds: float = 0.0
    rejected_worse: int = 0


_DATA: dict[str, Data] = {}


def _data(base: Base) -> Data:
    if base.name not in _DATA:
        _DATA[base.name] = base.data()
    return _DATA[base.name]


#: the action kinds the zoo applies by rebuilding the model (as `train.py heal` does with its `--model.*` flags): a
#: generic callback cannot swap a model's activations, the model's own settings can
REBUILT = ("activation", "loss_logits", "batch_size", "clean_labels", "label_source", "normalise_inputs")


def usable(actions: list[Action]) -> list[Action]:
    """The actions the zoo can apply: the generic ones (``callbacks.fixes``) and the :data:`REBUILT` ones."""
    return [a for a in actions if a in applicable(actions) or a.kind in REBUILT]


def build(
    base: Base, seed: int, operator: str, rebuilt: list[Action] | None = None, keep: Tensor | None = None
) -> tuple[Module, Data, int]:
    """The (mutated) model, its data and batch size; ``rebuilt``: :data:`REBUILT` actions, applied here; ``keep``:
    the training examples kept (``clean_labels``: see :func:`label_issues`)."""
    torch.manual_seed(seed)
    act = "sigmoid" if operator == "sigmoid" else base.act
    softmax = operator == "softmax"
    batch = 2 if operator == "batch 2" else base.batch
    clean = standardise = source = False
    for a in rebuilt or []:
        if a.kind == "activation":
            act = str(a.value)  # every hidden activation, as the model's one setting (train.py --model.activation)
        elif a.kind == "loss_logits":
            softmax = False  # the user's edit: the loss gets the logits (the softmax kept for predictions)
        elif a.kind == "batch_size":
            batch = max(batch, int(a.value))  # type: ignore[arg-type]  # the loader's (train.py --data.batch_size)
        elif a.kind == "clean_labels":
            clean = True
        elif a.kind == "label_source":
            source = True  # the user's fix of where the training labels come from: the operator's damage undone
        elif a.kind == "normalise_inputs":
            standardise = True
    net = base.build(base.norm and operator != "no norm", act)
    xt, yt, xv, yv = _data(base)
    lr = base.lr * {"lr x10": 10, "lr x100": 100, "lr /100": 0.01}.get(operator, 1)
    with torch.no_grad():
        layer = net.get_submodule(base.hidden)
        if operator == "zeros":
            layer.weight.zero_()
        elif operator == "large":
            layer.weight.mul_(10)
        elif operator == "small":
            layer.weight.mul_(0.1)
        elif operator == "no gain":
            for m in net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not list(net.modules())[-1]:
                    m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()))
    if operator == "frozen":
        for p in net.get_submodule(base.hidden).parameters():
            p.requires_grad_(False)
    if operator == "unnormalised":
        xt, xv = xt * 50 + 20, xv * 50 + 20
    if operator == "noisy labels" and not source:
        g = torch.Generator().manual_seed(seed)
        noisy = torch.rand(len(yt), generator=g) < 0.4
        yt = yt.clone()
        yt[noisy] = yt[noisy][torch.randperm(int(noisy.sum()), generator=g)]
    if standardise and xt.is_floating_point():  # the user's edit of the data: each feature at mean 0, std 1
        mean, std = xt.mean(0), xt.std(0).clamp_min(1e-8)
        xt, xv = (xt - mean) / std, (xv - mean) / std
    if clean and keep is not None:  # the user's edit of the data: the label issues dropped
        xt, yt = xt[keep], yt[keep]
    return Module(net, lr, base.optimizer, softmax=softmax), (xt, yt, xv, yv), batch


def label_issues(base: Base, seed: int, operator: str, model: Module) -> Tensor:
    """The training examples whose label a trained ``model`` predicts: what a user keeps after dropping the label
    issues its report points to, as cleanlab's ``find_label_issues(filter_by="predicted_neq_given")`` does (cleanlab
    would use out-of-sample probabilities; the zoo uses the sick run's own model, which has not memorised the wrong
    labels in its short fit)."""
    _, (xt, yt, _, _), _ = build(base, seed, operator)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model.net(xt[i : i + 4096]) for i in range(0, len(xt), 4096)])
    return logits.argmax(-1) == yt


def fit(
    base: Base, seed: int, operator: str, actions: list[Action], root: str, keep: Tensor | None = None
) -> tuple[float, list[Finding], float, Module]:
    """``(val loss, findings, seconds, model)`` of one run (with ``actions`` applied when training starts)."""
    model, (xt, yt, xv, yv), batch = build(base, seed, operator, [a for a in actions if a.kind in REBUILT], keep)
    actions = applicable(actions)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=batch, shuffle=True, generator=g, drop_last=True)
    monitor = HealthMonitor(every_n_steps=max(base.steps // 60, 1), report=False, warn=False)
    callbacks: list[Any] = [monitor]
    if actions:
        callbacks.append(ApplyFixes(actions, seed=seed))
    # one validation at the last step, as a user's loop has (the label judge compares it with the training loss)
    val_loader = DataLoader(TensorDataset(xv, yv), batch_size=len(yv))
    trainer = L.Trainer(
        max_steps=base.steps, logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, accelerator="cpu", deterministic=False,
        check_val_every_n_epoch=None, val_check_interval=base.steps, num_sanity_val_steps=0,
    )  # fmt: skip
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader, val_loader)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xv[i : i + 4096]) for i in range(0, len(xv), 4096)])
        val = nn.functional.cross_entropy(logits, yv).item()
    if not math.isfinite(val):
        val = 100.0  # a diverged run: worse than any
    return val, monitor.findings, seconds, model


def _problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "problem"]


def _names_layer(findings: list[Finding], layer: str) -> bool:
    """Whether a problem finding names ``layer``, its block (the same parent module), or targets it in an action."""
    block = layer.rsplit(".", 1)[0] if "." in layer else layer
    for f in _problems(findings):
        places = [f.where.split(" ")[0], *(f.action.targets if f.action else ())]
        for place in places:
            place = place.removesuffix(".weight").removesuffix(".bias")
            if place and (place in (layer, block) or place.startswith(block + ".")):
                return True
    return False


def heal(
    base: Base, run: Run, findings: list[Finding], model: Module, noise: float, root: str, rounds: int = 3
) -> None:
    """The repair loop with the usable actions (:func:`usable`), as `train.py heal`: each round refits with all the
    new ones together and, when there are several, with each alone, and keeps the best of those fits if it improves
    on the best so far beyond the noise. A fit whose whole set of changes was fitted before is not fitted again (a
    fix not kept in one round is tried again on top of the next round's kept change); a change of a kind and
    targets already kept is not proposed again, except a learning-rate scaling (a decade at most per round)."""
    best_val, kept, tried = run.val, [], set()
    current, keep = findings, None
    for number in range(1, rounds + 1):
        done = {(a.kind, a.targets) for a in kept if a.kind != "scale_lr"}
        proposed = [a for a in usable(actions_of(current)) if (a.kind, a.targets) not in done]
        # one of each change the zoo makes: its activation is the model's one setting, whichever layer asked
        new = list({a.describe(): a for a in proposed}.values())
        options = [new] + ([[a] for a in new] if len(new) > 1 else [])
        options = [o for o in options if _config(kept, o) not in tried]
        if not options:
            break
        if keep is None and any(a.kind == "clean_labels" for a in new):
            keep = label_issues(base, run.seed, run.operator, model)  # from the model the findings came from
        choice: tuple[float, list[Action], list[Finding], int, Module] | None = None
        for changes in options:
            tried.add(_config(kept, changes))
            val, found, seconds, fitted = fit(base, run.seed, run.operator, [*kept, *changes], root, keep)
            run.heal_seconds += seconds
            changed = ", ".join(a.describe() for a in changes)
            run.heal_rounds.append({"round": number, "changed": changed, "val": round(val, 4), "kept": False})
            if val < best_val - noise and (choice is None or val < choice[0]):
                choice = (val, changes, found, len(run.heal_rounds) - 1, fitted)
            elif val > best_val + noise:
                run.rejected_worse += 1
        if choice is None:
            break  # nothing helped: the next round's findings would propose the same
        best_val, changes, current, index, model = choice
        run.heal_rounds[index]["kept"] = True
        kept = [*kept, *changes]
    run.heal_rounds.append({"final": round(best_val, 4)})


def _config(kept: list[Action], changes: list[Action]) -> tuple[str, ...]:
    """What a fit changes from the sick run, in any order (a learning-rate scaling twice is another fit)."""
    return tuple(sorted(a.describe() for a in [*kept, *changes]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI slice: blobs-mlp, 2 seeds, 4 operators")
    parser.add_argument("--bases", nargs="*", default=None, help=f"bases to run (default: all): {', '.join(BASES)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per base (noise); mutants use the first")
    parser.add_argument("--out", default=str(RESULTS / "fault_zoo"), help="results path without suffix")
    parser.add_argument(
        "--transformer",
        default=str(SWEEP),
        help="the Transformer sweep's runs to fold in: a transformer_sweep.json (default: the committed one), 'run'"
        " to run the sweep (6-9 min), 'none' to leave it out",
    )
    parser.add_argument(
        "--rescore", default=None, help="score the runs of this fault_zoo.json again (with --transformer), no training"
    )
    args = parser.parse_args(argv)
    if args.transformer not in ("run", "none") and not Path(args.transformer).is_file():
        parser.error(f"--transformer {args.transformer}: no such file; give a transformer_sweep.json, 'run' or 'none'")
    if args.rescore is not None:
        if not Path(args.rescore).is_file():
            parser.error(f"--rescore {args.rescore}: no such file; give a fault_zoo.json the zoo wrote")
        stored = json.loads(Path(args.rescore).read_text())
        runs = [Run(**r) for r in stored["runs"]]
        s = stored["summary"]
        cases = sweep_cases(args.transformer)
        summary = _save(Path(args.out), runs, s["noise"], None, s.get("quick", False), cases, s["minutes"])
        return {"summary": summary, "runs": runs}
    torch.set_num_threads(1)
    for name in ("lightning.pytorch", "lightning.fabric"):  # one line per run from here, not Lightning's banners
        logging.getLogger(name).setLevel(logging.ERROR)
    names_ = args.bases or list(BASES)
    operators = list(OPERATORS)
    seeds = args.seeds
    if args.quick:
        names_, operators, seeds = ["blobs-mlp"], ["lr /100", "zeros", "no gain", "softmax"], 2
    started = time.perf_counter()
    runs: list[Run] = []
    noise: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        for name in names_:
            base = BASES[name]
            if args.quick:
                base = Base(**{**asdict(base), "steps": 300})  # type: ignore[arg-type]
            base_runs = []
            for seed in range(seeds):
                val, found, seconds, _ = fit(base, seed, "", [], root)
                r = Run(name, seed, "", "", val, seconds)
                r.problems = [{"key": f.key, "where": f.where} for f in _problems(found)]
                r.actions = [a.describe() for a in actions_of(found)]
                r.flagged, r.sick = bool(r.problems), False
                base_runs.append(r)
                print(f"{name} seed {seed}: val {val:.4f}, {len(r.problems)} problems ({seconds:.1f} s)", flush=True)
            vals = [r.val for r in base_runs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            threshold = max(2 * std, 0.01)
            noise[name] = {"mean": statistics.mean(vals), "std": std, "threshold": threshold}
            runs += base_runs
            for op in operators:
                if op == "no norm" and not base.norm:
                    continue
                if op == "unnormalised" and not base.float_inputs:
                    continue
                if name == "names-gpt" and op in ("no norm", "sigmoid"):
                    continue  # its LayerNorms and GELUs are built in (bench_monitors' GPT)
                # named as the findings name it: inside the LightningModule, whose network is `net`
                r = Run(name, 0, op, f"net.{base.hidden}" if op in LAYER_OPS else "")
                r.val, found, r.seconds, model = fit(base, 0, op, [], root)
                r.problems = [{"key": f.key, "where": f.where} for f in _problems(found)]
                r.actions = [a.describe() for a in actions_of(found)]
                r.sick = r.val > noise[name]["mean"] + threshold
                r.flagged = bool(r.problems)
                if r.sick and r.flagged and r.layer:
                    r.layer_right = _names_layer(found, r.layer)
                if r.sick and r.flagged:
                    heal(base, r, found, model, threshold, root)
                    final = r.heal_rounds[-1]["final"]
                    r.healed = final <= noise[name]["mean"] + threshold
                runs.append(r)
                state = "sick" if r.sick else "equivalent"
                print(
                    f"{name} {op}: val {r.val:.4f} ({state}), {len(r.problems)} problems"
                    + (f", healed {r.healed} {r.heal_rounds}" if r.heal_rounds else ""),
                    flush=True,
                )
            summary = _save(Path(args.out), runs, noise, started, args.quick)  # after each base: partial results
    cases = sweep_cases(args.transformer)
    if cases:
        summary = _save(Path(args.out), runs, noise, started, args.quick, cases)
    print(f"fault zoo: {summary['minutes']} min; {json.dumps({k: v for k, v in summary.items() if k != 'noise'})}")
    return {"summary": summary, "runs": runs}


#: the Transformer sweep's runs (benchmarks/transformer_sweep.py), folded in by default from its committed results
SWEEP = RESULTS / "transformer_sweep.json"


def sweep_cases(source: str) -> list[dict[str, Any]]:
    """The Transformer sweep's runs as cases (``transformer_sweep.zoo_cases``): from a ``transformer_sweep.json``,
    scored again, or from a fresh sweep (``"run"``); none for ``"none"``.

    A case is sick when its verdict is not "trains well" (its final loss is worse than its variant's best learning
    rate's by more than twice the seed noise), flagged when any problem finding fired. The zoo does not try to heal
    them: the sweep's own page says what qk-layernorm does to them.
    """
    if source == "none":
        return []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import transformer_sweep

    if source == "run":
        return transformer_sweep.zoo_cases()
    return [transformer_sweep.case(s) for s in transformer_sweep.score(transformer_sweep.load(Path(source)))]


def _save(
    out: Path,
    runs: list[Run],
    noise: dict[str, Any],
    started: float | None,
    quick: bool,
    cases: list | None = None,
    minutes: float | None = None,
) -> dict[str, Any]:
    """Writes ``out``.json and .md; ``started``: when training started, or the ``minutes`` it took (a rescoring)."""
    summary = score(runs, cases or [])
    summary["minutes"] = minutes if started is None else round((time.perf_counter() - started) / 60, 1)
    summary["noise"], summary["quick"] = noise, quick
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep = [{k: c[k] for k in ("name", "verdict", "findings")} for c in cases or []]
    data = {"summary": summary, "runs": [asdict(r) for r in runs], "transformer_sweep": sweep}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(render(summary, runs, quick, cases or []))
    return summary


def score(runs: list[Run], cases: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The zoo's scores; with the Transformer sweep's ``cases``, detection precision and recall over both too."""
    bases = [r for r in runs if not r.operator]
    mutants = [r for r in runs if r.operator]
    sick = [r for r in mutants if r.sick]
    flagged_sick = [r for r in sick if r.flagged]
    flagged_healthy = [r for r in bases if r.flagged]
    with_layer = [r for r in flagged_sick if r.layer]
    healed = [r for r in sick if r.healed]
    # healed without a fix of the training labels' source (the user's edit that undoes the label operator)
    source = Action("label_source").describe()
    automatic = [r for r in healed if not any(x.get("kept") and source in x["changed"] for x in r.heal_rounds)]
    loop = [r for r in flagged_sick if r.heal_rounds]
    compute = [(r.seconds + r.heal_seconds) / r.seconds for r in loop if r.seconds > 0]

    def pct(a: int, b: int) -> float | None:
        return round(100 * a / b, 1) if b else None

    return {
        "bases": len(bases),
        "mutants": len(mutants),
        "sick": len(sick),
        "equivalent": len(mutants) - len(sick),
        "precision": pct(len(flagged_sick), len(flagged_sick) + len(flagged_healthy)),
        "recall": pct(len(flagged_sick), len(sick)),
        "layer_right": pct(sum(bool(r.layer_right) for r in with_layer), len(with_layer)),
        "layer_known": len(with_layer),
        "heal": pct(len(healed), len(sick)),
        "healed": len(healed),
        "heal_without_label_source": pct(len(automatic), len(sick)),
        "healed_without_label_source": len(automatic),
        "harmful_kept": 0,  # a change is kept only when the val loss improved beyond the noise
        "rejected_worse": sum(r.rejected_worse for r in mutants),
        "fixes_on_healthy_bases": sum(bool(r.actions) for r in bases),
        "compute": round(statistics.mean(compute), 2) if compute else None,
        **_with_sweep(len(flagged_sick), len(flagged_healthy), len(sick), cases or [], pct),
    }


def _with_sweep(
    flagged_sick: int, flagged_healthy: int, sick: int, cases: list[dict[str, Any]], pct: Callable[..., Any]
) -> dict[str, Any]:
    """Precision and recall over the zoo and the sweep's cases (a healthy case: one that trains well)."""
    if not cases:
        return {}
    sick_cases = [c for c in cases if c["verdict"] != "trains well"]
    caught = sum(bool(c["findings"]) for c in sick_cases)
    false = sum(bool(c["findings"]) for c in cases if c["verdict"] == "trains well")
    return {
        "sweep_runs": len(cases),
        "sweep_sick": len(sick_cases),
        "sweep_flagged_sick": caught,
        "sweep_flagged_healthy": false,
        "precision_all": pct(flagged_sick + caught, flagged_sick + caught + flagged_healthy + false),
        "recall_all": pct(flagged_sick + caught, sick + len(sick_cases)),
    }


def render(s: dict[str, Any], runs: list[Run], quick: bool, cases: list[dict[str, Any]] | None = None) -> str:
    lines = [
        "# The fault zoo: detection, the right layer, and whether the report's fixes heal",
        "",
        f"`python benchmarks/fault_zoo.py{' --quick' if quick else ''}`: {s['bases']} base runs, {s['mutants']}"
        f" mutants ({s['sick']} sick, {s['equivalent']} equivalent), {s['minutes']} min on a shared 2-core CPU.",
        "How it is scored: the module docstring of benchmarks/fault_zoo.py.",
        "",
        "| | this zoo | AutoTrainer (ICSE 2021) | DeepFD (ICSE 2022) | DeepLocalize (ICSE 2021) | target |",
        "|---|---|---|---|---|---|",
        f"| detection precision | {s['precision']} % | - | - | - | >= 95 % |",
        f"| detection recall | {s['recall']} % ({s['sick']} sick) | - | 52 % of 58 diagnosed | - | >= 90 % |",
        f"| right layer | {s['layer_right']} % of {s['layer_known']} | model-wide only | - | 21 of 40 localised |"
        " >= 90 % |",
        f"| heal rate | {s['heal']} % ({s['healed']} of {s['sick']}) | 97.33 % of 262 repaired | - | - | >= 90 % |",
        f"| heal rate, the labels' source left unfixed | {s['heal_without_label_source']} %"
        f" ({s['healed_without_label_source']} of {s['sick']}) | - | - | - | |",
        f"| harmful fixes kept | {s['harmful_kept']} (rejected as worse: {s['rejected_worse']}) | - | - | - | 0 |",
        f"| fixes proposed on healthy bases | {s['fixes_on_healthy_bases']} | - | - | - | 0 |",
        f"| compute (loop / sick run) | {s['compute']}x | 1.19x | - | - | |",
        "",
        "Seed noise of each base (val loss over seeds): "
        + ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in s["noise"].items())
        + ".",
        "",
        "| base | operator | layer | val | sick? | problems | layer right? | repair rounds | healed? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        problems = "<br>".join(f"{p['key']} `{p['where']}`" if p["where"] else p["key"] for p in r.problems) or "-"
        rounds = "<br>".join(
            f"{x['round']}: {x['changed']} -> {x['val']}{' kept' if x['kept'] else ''}"
            for x in r.heal_rounds
            if "round" in x
        )
        sick = "base" if not r.operator else ("sick" if r.sick else "equivalent")
        lines.append(
            f"| {r.base} seed {r.seed} | {r.operator or '-'} | {r.layer or '-'} | {r.val:.4f} | {sick} | {problems}"
            f" | {'' if r.layer_right is None else r.layer_right} | {rounds or '-'} |"
            f" {'' if r.healed is None else r.healed} |"
        )
    if cases:
        lines += [
            "",
            "## The Transformer sweep's runs, folded in",
            "",
            f"{s['sweep_runs']} runs of `benchmarks/transformer_sweep.py` (docs/results/transformer_sweep.md), scored"
            " against the best learning rate of their own variant: sick when the final loss is worse by more than"
            " twice the seed noise. The zoo does not heal them (qk-layernorm's effect is on the sweep's page).",
            "",
            "| | zoo | sweep | both | target |",
            "|---|---|---|---|---|",
            f"| detection precision | {s['precision']} % | {s['sweep_flagged_sick']} flagged sick,"
            f" {s['sweep_flagged_healthy']} flagged healthy | {s['precision_all']} % | >= 95 % |",
            f"| detection recall | {s['recall']} % of {s['sick']} | {s['sweep_flagged_sick']} of {s['sweep_sick']}"
            f" | {s['recall_all']} % of {s['sick'] + s['sweep_sick']} | >= 90 % |",
            "",
            "| run | verdict | problems |",
            "|---|---|---|",
        ]
        for c in cases:
            keys = sorted({f["key"].split("/")[0] for f in c["findings"]})
            lines.append(f"| {c['name']} | {c['verdict']} | {', '.join(keys) or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
