"""Adam's epsilon against each parameter's gradient scale: when ε swamps the update.

Adam divides each element's momentum by ``sqrt(v_hat) + ε`` (``v_hat``: the bias-corrected second moment, about the
gradient's mean square). While the gradient's RMS is far above ε, ε changes nothing; when it falls to the order of
ε (a parameter whose gradients are tiny: late layers of a large model, a small loss scale, or an ε raised by
hand), the denominator is ε, and the update shrinks by ``r = ε / (sqrt(v_hat) + ε)``, toward 0 (Wortsman et al.
2023: "AdamW epsilon"; the fix: a smaller ε). The probe reads, after each recorded step's optimizer step, the
optimizer's own state, per parameter: the share of elements where ε dominates (``ε > sqrt(v_hat)``: the update is
less than half of what it would be without ε), the mean shrink ``r``, the RMS of ``sqrt(v_hat)`` against ε, and
the RMS of the normalised update ``m_hat / (sqrt(v_hat) + ε)`` (the step divided by the learning rate: about
0.1 to 1 for a gradient with a direction, near 0 when ε dominates).

Which optimizers: ``torch.optim.Adam`` and ``AdamW`` (their subclasses too), whatever their implementation
(``foreach``, ``fused``, ``capturable``: the same ``exp_avg``, ``exp_avg_sq``, ``step`` state), with ``amsgrad``
(``max_exp_avg_sq`` is then the denominator). Others (NAdam, RAdam, Adafactor, 8-bit Adams) are left out: their
denominators differ. Under DDP every rank holds the same state and the numbers are those of one; a sharded
optimizer (FSDP) sums its shards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from callbacks._cadence import Cadence, Moment
from callbacks._compile import tag_name
from callbacks._stats import CHUNK, Summary
from callbacks.probes.base import Chart, Probe, Recording, Scalar

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import Tensor

#: elements of optimizer state read in one batch of whole-batch operations: about a dozen float64 temporaries of it
#: (~7 MiB), so a recorded step's peak memory barely moves, while a model's many small parameters share a batch
BATCH = CHUNK // 16


@dataclass
class EpsParam:
    """One parameter's Adam state after a recorded step."""

    name: str
    eps: float
    dominated: float  # share of elements with eps > sqrt(v_hat)
    shrink: float  # mean of eps / (sqrt(v_hat) + eps): how much eps takes off the update, on average
    sqrt_v_rms: float  # RMS of sqrt(v_hat) (compare with eps)
    update_rms: float  # RMS of m_hat / (sqrt(v_hat) + eps): the step over the learning rate
    count: int


@dataclass
class AdamEps:
    prefix: ClassVar[str] = "adam_eps"  # its probe's: a judge reads it as `readouts[AdamEps]`
    step: int
    params: list[EpsParam]  # in the model's named_parameters() order


CHART = Chart(
    "Adam: share of elements where ε dominates sqrt(v_hat) (high: a smaller ε)", "adam_eps/dominated", order=83
)


def is_adam(optimizer: Any) -> bool:
    """Whether the probe reads ``optimizer``: torch's ``Adam`` or ``AdamW`` (any implementation)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


class AdamEpsProbe(Probe):
    """Watches Adam's ε against each parameter's ``sqrt(v_hat)``, from the optimizer state.

    Tags per parameter: ``adam_eps/{name}/dominated`` (share), ``/shrink`` (mean ``ε / (sqrt(v_hat) + ε)``),
    ``/sqrt_v_rms`` and ``/update_rms``.

    Args:
        cadence: when it records (default: the scalars of ``Trainer(log_every_n_steps)``).
    """

    prefix = "adam_eps"
    has_histograms = False

    def __init__(self, cadence: Cadence | None = None) -> None:
        super().__init__(cadence or Cadence(histogram_every_n_steps=0))
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.names: list[str] = []
        self._index: dict[int, int] = {}  # id(parameter) -> its entry

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [(tag_name(n), p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in params]
        self._index = {id(p): i for i, (_, p) in enumerate(params)}
        n = len(params)
        for name in ("elements", "dominated_count", "shrink_sum", "v_sum", "update_sq"):
            self.add_state(name, "sum", n)
        self.add_state("eps", "max", n)

    def watching(self, trainer: pl.Trainer) -> bool:
        return bool(self.names) and any(is_adam(o) for o in trainer.optimizers)

    def detach(self) -> None:
        self.names, self._index = [], {}

    def end_step(self, rec: Recording, outputs: Any) -> None:
        if self not in rec.moments:
            return
        for optimizer in rec.trainer.optimizers:
            if is_adam(optimizer):
                self._read(optimizer)

    def _read(self, optimizer: torch.optim.Optimizer) -> None:
        """Adds ``optimizer``'s state to this step's sums: its parameters' flat chunks batched up to :data:`BATCH`
        elements with the same bias corrections and ε (a parameter group's, at one step count), each batch in a few
        whole-batch operations (a model's many small parameters cost as few tensor operations as one large one; the
        temporaries stay bounded by the batch)."""
        batch: list[tuple[int, Tensor, Tensor]] = []  # (entry, v, m) per chunk
        size, key = 0, None  # key: (c1, c2, eps, device) of the batch
        for group in optimizer.param_groups:
            beta1, beta2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            for p in group["params"]:
                i, state = self._index.get(id(p)), optimizer.state.get(p)
                if i is None or not state or "exp_avg_sq" not in state:
                    continue
                t = float(state["step"])
                v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                m = state["exp_avg"]
                flat_v, flat_m = v.detach().reshape(-1), m.detach().reshape(-1)
                chunk_key = (1 - beta1**t, 1 - beta2**t, eps, flat_v.device)
                for v_part, m_part in zip(flat_v.split(BATCH), flat_m.split(BATCH), strict=True):
                    if batch and (size + v_part.numel() > BATCH or chunk_key != key):
                        self._add(batch, *key[:3])
                        batch, size = [], 0
                    key = chunk_key
                    batch.append((i, v_part, m_part))
                    size += v_part.numel()
        if batch:
            self._add(batch, *key[:3])

    def _add(self, batch: list[tuple[int, Tensor, Tensor]], c1: float, c2: float, eps: float) -> None:
        """One batch of chunks (on one device, with the bias corrections ``c1``, ``c2`` and ``eps``): per chunk,
        the element count, the count where ε dominates, the sum of ``ε / (sqrt(v_hat) + ε)``, of ``v_hat`` and of the
        squared normalised update, added to its entry."""
        f64 = torch.float64
        lengths = [v.numel() for _, v, _ in batch]
        v_hat = torch.cat([v for _, v, _ in batch]).to(f64).div_(c2)
        root = v_hat.sqrt()  # sqrt(v_hat)
        denom = root + eps
        update = torch.cat([m for _, _, m in batch]).to(f64).div_(c1).div_(denom)  # m_hat / (sqrt(v_hat) + ε)
        values = torch.stack([(root < eps).to(f64), denom.reciprocal_().mul_(eps), v_hat, update.square_()])
        # per chunk, a sum over its contiguous columns (a scatter-add by chunk index costs ~20x more on CPU)
        sums = torch.stack([part.sum(1) for part in values.split(lengths, 1)], 1)  # (4, chunks)
        target = self.elements.device
        entries = torch.tensor([i for i, *_ in batch], device=target)
        self.elements.index_add_(0, entries, torch.tensor(lengths, dtype=f64, device=target))
        states = (self.dominated_count, self.shrink_sum, self.v_sum, self.update_sq)
        for state, row in zip(states, sums.to(target), strict=True):
            state.index_add_(0, entries, row)
        self.eps.scatter_reduce_(0, entries, torch.full((len(batch),), eps, dtype=f64, device=target), "amax")

    def read(self, step: int, moment: Moment, summaries: dict[str, Summary]) -> AdamEps | None:
        params = []
        for i, name in enumerate(self.names):
            n = float(self.elements[i])
            if n == 0:
                continue
            params.append(
                EpsParam(
                    name,
                    float(self.eps[i]),
                    float(self.dominated_count[i]) / n,
                    float(self.shrink_sum[i]) / n,
                    math.sqrt(float(self.v_sum[i]) / n),
                    math.sqrt(float(self.update_sq[i]) / n),
                    int(n),
                )
            )
        return self._keep(AdamEps(step, params), moment, bool(params)) if params else None

    def scalars(self, readout: AdamEps | None) -> list[Scalar]:
        out = []
        for p in readout.params if readout is not None else []:
            tag = f"adam_eps/{p.name}"
            out += [
                Scalar(f"{tag}/dominated", p.dominated, p.name, CHART),
                Scalar(f"{tag}/shrink", p.shrink),
                Scalar(f"{tag}/sqrt_v_rms", p.sqrt_v_rms),
                Scalar(f"{tag}/update_rms", p.update_rms),
            ]
        return out

    def rows(self) -> tuple[list[str], list[list[str]]]:
        last = self.latest
        rows = [
            [
                p.name,
                f"{p.eps:.0e}",
                f"{p.sqrt_v_rms:.2e}",
                f"{p.dominated:.1%}",
                f"{p.shrink:.1%}",
                f"{p.update_rms:.3f}",
            ]
            for p in (last.params if last is not None else [])
        ]
        return ["parameter", "ε", "RMS sqrt(v_hat)", "ε dominates", "mean shrink", "update RMS / lr"], rows
