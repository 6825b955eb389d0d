"""The LightningModule: training logic around the plain `MLP` (loss, optimizers, schedules, sampling).

The network is built once the vocabulary is known: from `vocab` when given (a checkpoint carries it, so
sampling needs no data file), else from the DataModule in `setup`. The vocabulary and block size are then
written into `hparams`, so every checkpoint can rebuild the model on its own.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_makemore.data import END_TOKEN, Vocabulary
from lightning_makemore.model import MLP, ActivationName, InitName, check_mlp_args

#: per-step module hooks whose default (LightningModule's) does nothing
_NOOP_STEP_HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)
#: batch hooks whose default (in LightningModule and LightningDataModule) returns the batch unchanged
_IDENTITY_BATCH_HOOKS = ("on_before_batch_transfer", "on_after_batch_transfer")
OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["step", "constant", "cosine", "onecycle"]
SCHEDULES: tuple[str, ...] = ("step", "constant", "cosine", "onecycle")
LECTURE_SEED = 2147483647
# the hyperparameters that are `MLP` arguments, passed through as they are
NET_ARGS = (
    "n_embd",
    "n_hidden",
    "n_layers",
    "init",
    "last_layer_scale",
    "batchnorm",
    "bn_momentum",
    "bn_eps",
    "logits_batchnorm",
    "logits_bn_gamma",
    "activation",
    "dropout",
    "context_dropout",
)


class MakemoreModule(L.LightningModule):
    """makemore's MLP language model, trained the lecture's way by default.

    Defaults are the lecture's BatchNorm MLP: n_embd 10, n_hidden 200, Kaiming init, softmax fix
    (last layer x 0.01), BatchNorm with momentum 0.001, SGD with lr 0.1 dropped to 0.01 halfway.

    Args:
        vocab: the characters, index 0 being `.`. None: taken from the DataModule in `setup`.
        block_size: characters of context. None: taken from the DataModule in `setup`.
        n_embd, n_hidden, n_layers, init, last_layer_scale, batchnorm, bn_momentum, bn_eps,
            logits_batchnorm, logits_bn_gamma, activation, dropout, context_dropout: the network, see `MLP`.
        init_seed: seeds the initial weights (the lecture's 2147483647); None draws them from the global RNG.
        optimizer: ``"sgd"`` (the lecture: plain SGD, no momentum) or ``"adamw"``.
        lr: learning rate (the peak for ``onecycle``).
        schedule: ``"step"``: lr, then lr x `lr_decay_factor` from `lr_decay_at` x max_steps on (the lecture:
            0.1 then 0.01 after 50 %, 75 % for the deep net); ``"constant"``; ``"cosine"`` decay to
            lr x `lr_decay_factor`; ``"onecycle"``: warm-up over `warmup` of the steps, then cosine anneal.
        lr_decay_at: fraction of the training steps after which the ``step`` schedule drops the lr.
        lr_decay_factor: the ``step`` schedule's drop, and the floor of ``cosine``.
        warmup: fraction of steps spent warming up in ``onecycle``.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD) on weight matrices and the embedding only.
        momentum: SGD momentum (the lecture: 0).
        betas: AdamW's betas.

    Example::

        model = MakemoreModule(n_hidden=200)
        trainer = L.Trainer(max_steps=200_000)
        trainer.fit(model, datamodule=NamesDataModule())
        print(model.sample(5))
    """

    def __init__(
        self,
        vocab: list[str] | None = None,
        block_size: int | None = None,
        n_embd: int = 10,
        n_hidden: int = 200,
        n_layers: int = 1,
        init: InitName = "kaiming",
        last_layer_scale: float | None = 0.01,
        batchnorm: bool = True,
        bn_momentum: float = 0.001,
        bn_eps: float = 1e-5,
        logits_batchnorm: bool = False,
        logits_bn_gamma: float = 0.1,
        activation: ActivationName = "tanh",
        dropout: float = 0.0,
        context_dropout: float = 0.0,
        init_seed: int | None = LECTURE_SEED,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        schedule: ScheduleName = "step",
        lr_decay_at: float = 0.5,
        lr_decay_factor: float = 0.1,
        warmup: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
    ) -> None:
        super().__init__()
        check_mlp_args(
            vocab_size=len(vocab) if vocab is not None else None,
            block_size=block_size,
            n_embd=n_embd,
            n_hidden=n_hidden,
            n_layers=n_layers,
            init=init,
            activation=activation,
            dropout=dropout,
            bn_momentum=bn_momentum,
            context_dropout=context_dropout,
        )
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Expected optimizer 'sgd' or 'adamw', but got {optimizer!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected schedule to be one of {', '.join(SCHEDULES)}, but got {schedule!r}.")
        if not lr > 0:
            raise ValueError(f"Expected lr > 0, but got {lr!r}.")
        if not 0.0 <= lr_decay_at <= 1.0 or not 0.0 <= warmup < 1.0:
            raise ValueError(f"Expected lr_decay_at in [0, 1] and warmup in [0, 1), got {lr_decay_at}, {warmup}.")
        if vocab is not None and (not vocab or vocab[0] != END_TOKEN):
            raise ValueError(f"Expected vocab to start with {END_TOKEN!r}, but got {vocab[:3]!r}.")
        self.save_hyperparameters()
        self.net: MLP | None = None
        self._shadowed_hooks: list[str] = []
        self.vocab: Vocabulary | None = None
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        if vocab is not None and block_size is not None:
            self._build(Vocabulary(tuple(vocab)), block_size)

    # -- building ------------------------------------------------------------------------------------
    def _build(self, vocab: Vocabulary, block_size: int) -> None:
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.init_seed) if hp.init_seed is not None else None
        self.vocab = vocab
        # resolved values go into the checkpoint's hparams (and the logged ones), so a checkpoint rebuilds the net
        for hparams in (self.hparams, getattr(self, "_hparams_initial", None) or {}):
            hparams["vocab"], hparams["block_size"] = list(vocab.itos), block_size
        net_args = {name: hp[name] for name in NET_ARGS}
        self.net = MLP(vocab_size=len(vocab), block_size=block_size, generator=generator, **net_args)

    def _datamodule(self) -> Any:
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    @override
    def configure_model(self) -> None:
        """Build the net from the DataModule's vocabulary and block size, unless it exists already.

        Lightning calls this after `setup`; callbacks that copy the model in their own `setup` (which runs
        before the module's), such as `EMAWeightAveraging`, call it themselves first.
        """
        if self.net is not None:
            return
        datamodule = self._datamodule()
        data_vocab = getattr(datamodule, "vocab", None)
        block_size = self.hparams.block_size or getattr(datamodule, "block_size", None)
        if data_vocab is None or block_size is None:
            raise ValueError(
                "The model has no vocabulary: pass a NamesDataModule (or `vocab` and `block_size`), "
                "or load it from a checkpoint with --ckpt_path."
            )
        self._build(data_vocab, block_size)

    @override
    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        if datamodule is not None and stage == "fit":
            check_batch_size(self.hparams, datamodule.batch_size)
        self.configure_model()
        data_vocab = getattr(datamodule, "vocab", None)
        if data_vocab is not None and tuple(data_vocab.itos) != tuple(self.vocab.itos):
            raise ValueError(
                f"The data's vocabulary ({len(data_vocab)} characters) differs from the model's "
                f"({len(self.vocab)}): train on the same names file the checkpoint was trained on."
            )
        data_block = getattr(datamodule, "block_size", None)
        if data_vocab is not None and data_block is not None and data_block != self.hparams.block_size:
            raise ValueError(
                f"Expected --data.block_size {self.hparams.block_size} (the model's), but got {data_block}."
            )

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.net is None:  # a model created without vocabulary gets it from the checkpoint
            hp = checkpoint.get("hyper_parameters", {})
            if hp.get("vocab") and hp.get("block_size"):
                self._build(Vocabulary(tuple(hp["vocab"])), hp["block_size"])

    @override
    def on_fit_start(self) -> None:
        # Lightning calls some 12 module hooks a step, each in a profiler context (~4 us); those this class
        # leaves as LightningModule's empty methods are shadowed by None, which Lightning skips (it calls a
        # hook only if it is callable). Subclasses that override one keep it; `teardown` restores them all.
        hooks = list(_NOOP_STEP_HOOKS)
        if self.trainer.gradient_clip_val is None:  # the default hook clips only when that is set
            hooks.append("configure_gradient_clipping")
        for hook in hooks:
            if getattr(type(self), hook) is getattr(L.LightningModule, hook) and hook not in self.__dict__:
                object.__setattr__(self, hook, None)
                self._shadowed_hooks.append(hook)

    @override
    def teardown(self, stage: str) -> None:
        for hook in self._shadowed_hooks:
            self.__dict__.pop(hook, None)
        self._shadowed_hooks = []

    @override
    def _call_batch_hook(self, hook_name: str, *args: Any) -> Any:
        # Lightning looks up on every batch which of the module and the data module overrides each batch hook
        # (two `is_overridden` each), then calls it in a profiler context. Neither overrides these two here,
        # whose default returns the batch as it is: return it at once (a subclass that overrides one is called).
        if hook_name in _IDENTITY_BATCH_HOOKS and not _overrides_batch_hook(self, hook_name):
            return args[0]
        return super()._call_batch_hook(hook_name, *args)

    @override
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around every hook call (about 46 times a step);
        # nn.Module.__setattr__'s Parameter/Module/buffer checks then cost ~7 % of this tiny model's step.
        # A plain string attribute is stored exactly as nn.Module would store it.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- steps ---------------------------------------------------------------------------------------
    @override
    def forward(self, idx: Tensor) -> Tensor:
        return self.net(idx)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        # each self.log call costs about as much as this model's whole step: log only what will be written
        if _will_log(self.trainer):
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(y))
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning validates (and so checkpoints) at epoch ends, or when a run asks to stop: a run whose
        # max_steps ends inside an epoch asks, so it ends with a final val/loss and a checkpoint of its last
        # weights. (A hook here rather than a callback: every callback costs each step of this tiny model.)
        trainer = self.trainer
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: MeanMetric, name: str) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        # weighted by batch size: the exact mean over the whole split, also summed across DDP ranks
        metric.update(loss.detach(), weight=len(y))
        self.log(name, metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.val_loss, "val/loss")

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.test_loss, "test/loss")

    @override
    def predict_step(self, batch: dict[str, int], batch_idx: int) -> list[str]:
        if batch["num"] == 0:  # the empty request of a rank other than zero
            return []
        names = self.sample(batch["num"], seed=batch["seed"])
        self.print("\n".join(names))  # rank zero only
        return names

    # -- optimisation --------------------------------------------------------------------------------
    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.net.parameters():
            # weight matrices and the embedding decay; biases and BatchNorm's gamma/beta do not
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.schedule == "constant":
            return optimizer
        total = self._total_steps()
        factor = _schedule(hp.schedule, total, hp.lr_decay_at, hp.lr_decay_factor, hp.warmup)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return max(1, int(trainer.estimated_stepping_batches))

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num: int = 20, seed: int | None = LECTURE_SEED + 10, max_len: int = 64) -> list[str]:
        """Generate `num` names, the lecture's way: eval mode, softmax, multinomial, stop at `.`.

        Args:
            num: how many names.
            seed: seeds the sampling generator (the lecture's 2147483647 + 10); None uses the global RNG.
            max_len: a name is cut after this many characters if `.` has not come.

        Example::

            model = MakemoreModule.load_from_checkpoint("last.ckpt", map_location="cpu")
            model.sample(3)  # e.g. ['carlah', 'amelle', 'khyim']
        """
        if self.net is None or self.vocab is None:
            raise RuntimeError("The model is not built yet: fit it, or load it from a checkpoint.")
        if num < 1:
            raise ValueError(f"Expected num >= 1, but got {num}.")
        was_training = self.net.training
        self.net.eval()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        block_size = self.hparams.block_size
        context = torch.zeros(num, block_size, dtype=torch.long, device=self.device)  # (num, block_size)
        out = torch.zeros(num, max_len, dtype=torch.long)
        done = torch.zeros(num, dtype=torch.bool)
        for t in range(max_len):
            probs = F.softmax(self.net(context).float(), dim=-1).cpu()  # (num, vocab)
            ix = torch.multinomial(probs, num_samples=1, generator=g).squeeze(1)  # (num,)
            ix[done] = 0
            out[:, t] = ix
            done |= ix == 0
            if bool(done.all()):
                break
            context = torch.cat([context[:, 1:], ix.to(self.device).unsqueeze(1)], dim=1)
        self.net.train(was_training)
        names = []
        for row in out.tolist():
            ids = row[: row.index(0)] if 0 in row else row
            names.append(self.vocab.decode(ids))
        return names


def _schedule(name: str, total: int, decay_at: float, decay_factor: float, warmup: float):
    """The multiplier of the base lr at optimizer step `step`, for `LambdaLR`."""
    if name == "step":
        boundary = int(decay_at * total)
        return lambda step: 1.0 if step < boundary else decay_factor
    if name == "cosine":
        return lambda step: decay_factor + (1 - decay_factor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    warm = max(1, int(warmup * total))  # onecycle: linear warm-up from lr/25, then cosine to lr/1e4

    def onecycle(step: int) -> float:
        if step < warm:
            return 0.04 + 0.96 * step / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * t))

    return onecycle


def _overrides_batch_hook(module: L.LightningModule, hook: str) -> bool:
    """Whether the module, or the data module it trains on, defines its own `hook`."""
    if getattr(type(module), hook) is not getattr(L.LightningModule, hook):
        return True
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return datamodule is not None and getattr(type(datamodule), hook) is not getattr(L.LightningDataModule, hook)


def _will_log(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's metrics (steps n-1, 2n-1, ... for log_every_n_steps n)."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "should_update_logs"):
        return bool(connector.should_update_logs)
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0


def check_batch_size(hparams: Any, batch_size: int) -> None:
    """BatchNorm cannot normalise one example: refuse batch size 1 with it, before training starts."""
    if batch_size < 2 and (hparams.get("batchnorm") or hparams.get("logits_batchnorm")):
        raise ValueError(
            f"Expected --data.batch_size >= 2 with BatchNorm, but got {batch_size}: BatchNorm cannot "
            "normalise a batch of one example. Use a larger batch or --model.batchnorm false."
        )


@torch.no_grad()
def split_loss(net: torch.nn.Module, X: Tensor, Y: Tensor, batch_size: int = 65536) -> float:
    """Mean cross-entropy of `net` (in eval mode) over a whole split, like the lecture's `split_loss`."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    total = 0.0
    for i in range(0, len(X), batch_size):
        x, y = X[i : i + batch_size].to(device), Y[i : i + batch_size].to(device)
        total += F.cross_entropy(net(x), y, reduction="sum").double().item()
    net.train(was_training)
    return total / len(X)


# Lightning reads training_step's signature on every step (`inspect.getfullargspec`, about 10 us on a CPU here);
# inspect returns a function's `__signature__` when it has one instead of rebuilding it
MakemoreModule.training_step.__signature__ = inspect.signature(MakemoreModule.training_step)
