"""The LightningModule: training logic around the plain `MLP` (loss, optimizers, schedules, sampling).

The network is built in `__init__` from the vocabulary and block size (the CLI links them from the
DataModule; a checkpoint carries them in its hyperparameters). A module created without them, to be loaded
from a checkpoint, builds the net when the checkpoint arrives (`on_load_checkpoint`). This file reads as
plain Lightning: the speed tricks that reach into Lightning's internals live in `fastpath.py`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_makemore.data import END_TOKEN, Vocabulary
from lightning_makemore.model import MLP, net_settings

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["step", "constant", "cosine", "onecycle"]
SCHEDULES: tuple[str, ...] = ("step", "constant", "cosine", "onecycle")
LECTURE_SEED = 2147483647


class MakemoreModule(L.LightningModule):
    """makemore's MLP language model, trained the lecture's way by default.

    Defaults are the lecture's BatchNorm MLP: n_embd 10, n_hidden 200, Kaiming init, softmax fix
    (last layer x 0.01), BatchNorm with momentum 0.001, SGD with lr 0.1 dropped to 0.01 halfway.

    Args:
        vocab: the characters, index 0 being `.` (the DataModule's ``vocab.itos``). None: the net is built
            when a checkpoint is loaded.
        block_size: characters of context (the DataModule's). None: taken from the checkpoint.
        init_seed: seeds the initial weights (the lecture's 2147483647); None draws them from the global RNG.
        optimizer: ``"sgd"`` (the lecture: plain SGD, no momentum) or ``"adamw"``.
        lr: learning rate (the peak for ``onecycle``).
        schedule: ``"step"``: lr, then lr x `lr_decay_factor` from `lr_decay_at` x max_steps on;
            ``"constant"``; ``"cosine"`` decay to lr x `lr_decay_factor`; ``"onecycle"``: warm-up, then anneal.
        lr_decay_at: fraction of the training steps after which the ``step`` schedule drops the lr.
        lr_decay_factor: the ``step`` schedule's drop, and the floor of ``cosine``.
        warmup: fraction of steps spent warming up in ``onecycle``.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD) on weight matrices and the embedding only.
        momentum: SGD momentum (the lecture: 0).
        betas: AdamW's betas.
        **net: the network's settings, `MLP`'s keyword arguments (n_embd, n_hidden, n_layers, init, ...);
            their defaults are MLP's.

    Example::

        >>> model = MakemoreModule(vocab=[".", "a", "b"], block_size=3, n_hidden=16)
        >>> model.net.head.out_features, model.hparams.n_hidden, model.hparams.n_layers
        (3, 16, 1)
    """

    def __init__(
        self,
        vocab: list[str] | None = None,
        block_size: int | None = None,
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
        **net: Any,
    ) -> None:
        super().__init__()
        net = net_settings(**net)  # MLP's defaults filled in (so hparams and logs hold every value), checked
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"Expected optimizer 'sgd' or 'adamw', but got {optimizer!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"Expected schedule to be one of {', '.join(SCHEDULES)}, but got {schedule!r}.")
        if not lr > 0:
            raise ValueError(f"Expected lr > 0, but got {lr!r}.")
        if not 0.0 <= lr_decay_at <= 1.0 or not 0.0 <= warmup < 1.0:
            raise ValueError(f"Expected lr_decay_at in [0, 1] and warmup in [0, 1), got {lr_decay_at}, {warmup}.")
        if vocab is not None and (not vocab or vocab[0] != END_TOKEN):
            raise ValueError(f"Expected vocab to start with {END_TOKEN!r}, but got {list(vocab)[:3]!r}.")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"Expected block_size to be an integer >= 1, but got {block_size!r}.")
        self.save_hyperparameters()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.net: MLP | None = None
        self.vocab: Vocabulary | None = None
        if vocab is not None and block_size is not None:
            self.vocab = Vocabulary(tuple(vocab))
            # the one place the network is built (a checkpoint without data comes through here too)
            generator = torch.Generator().manual_seed(init_seed) if init_seed is not None else None
            self.net = MLP(len(vocab), block_size, generator=generator, **net)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A module created without vocabulary gets its net from the checkpoint's hyperparameters; one created
        with another vocabulary or block size is refused with the reason (not a tensor-size mismatch)."""
        saved = checkpoint.get("hyper_parameters", {})
        if self.net is None and saved.get("vocab") and saved.get("block_size"):
            built = type(self)(**{k: v for k, v in saved.items() if not k.startswith("_")})
            self.hparams.update(built.hparams)
            self.vocab, self.net = built.vocab, built.net
            return
        for key in ("vocab", "block_size"):
            if saved.get(key) is not None and self.hparams.get(key) is not None and saved[key] != self.hparams[key]:
                raise ValueError(
                    f"The checkpoint's {key} differs from the model's ({_short(saved[key])} vs "
                    f"{_short(self.hparams[key])}): use the names file and --data.block_size it was trained with."
                )

    @override
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if stage == "fit" and datamodule is not None and hasattr(datamodule, "batch_size"):
            check_batch_size(self.hparams, datamodule.batch_size)

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
            # the lr this step uses, beside the loss: the schedule's drop explains the cliff in every chart
            lr = self.optimizers(use_pl_optimizer=False).param_groups[0]["lr"]
            self.log("train/lr", lr, batch_size=len(y))
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
        if self.net is None:
            raise ValueError(
                "The model has no network: create it with `vocab` and `block_size` (the DataModule's), "
                "or load it from a checkpoint with --ckpt_path."
            )
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

    @override
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """The lecture's ``p.grad = None`` for every parameter the optimizer steps: what ``torch.optim``'s
        ``zero_grad()`` does, less its per-call set-up (a profiler range, a dynamo guard), which costs about 5 %
        of this model's step. An optimizer with a ``zero_grad`` of its own gets that one."""
        if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
            optimizer.zero_grad()
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

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
            raise RuntimeError("The model has no network yet: create it with `vocab`, or load a checkpoint.")
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


def _will_log(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training step's metrics: steps n-1, 2n-1, ... for log_every_n_steps n, and
    the step a run is asked to stop at (the rule of Lightning's logger connector, from public trainer state)."""
    return (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0 or trainer.should_stop


def _short(value: Any) -> str:
    return f"{len(value)} characters" if isinstance(value, list) else repr(value)


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
