"""The every-step trace: a few cheap numbers a training step, kept on the device in a ring, never written.

When a recorder traces, its probes put into each step's row a handful of numbers (the loss, each watched
parameter's gradient norm and sampled update:data ratio, each watched module's output RMS): one small reduction
each, no host read. The ring holds the last :data:`SIZE` steps; the judges read the rows written since they last
read (one device->host copy, on the recorder's recorded steps and at the end of fit), e.g. to find which layer
moved first before a loss spike. Each rank traces its own steps (its share of the batch).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

#: steps the ring holds: more than the judges' window between two reads (a recorded step every 50 by default)
SIZE = 1024


@dataclass
class TraceRows:
    """The trace rows written since the last read: ``rows[i][j]`` is column ``j`` at ``steps[i]`` (NaN: not seen)."""

    prefix: ClassVar[str] = "trace"  # what the recorder gives it under: a judge reads it as `readouts[TraceRows]`

    columns: list[str]
    steps: list[int]
    rows: list[list[float]]


class Trace:
    """A ring of ``SIZE`` rows of ``columns``, float32, on ``device``."""

    def __init__(self, columns: list[str], device: torch.device, size: int = SIZE) -> None:
        self.columns = columns
        self.index = {c: i for i, c in enumerate(columns)}
        self.size = size
        self.ring = torch.full((size, len(columns)), math.nan, dtype=torch.float32, device=device)
        self.steps = [-1] * size
        self.written = 0  # rows written so far
        self.read_upto = 0  # rows read so far
        self._where: dict[tuple[str, ...], Tensor] = {}  # columns -> their indices in a row (made once)

    def write(self, step: int, traced: dict[tuple[str, ...], Tensor]) -> None:
        """Writes one step's row: ``{columns: values}`` (a 0-dim tensor for one column, 1-D for several)."""
        row = self.written % self.size
        if sum(len(c) for c in traced) < len(self.columns):  # some column not seen this step: NaN
            self.ring[row].fill_(math.nan)
        for columns, values in traced.items():
            where = self._where.get(columns)
            if where is None:
                where = self._where[columns] = torch.tensor(
                    [self.index[c] for c in columns], dtype=torch.long, device=self.ring.device
                )
            self.ring[row].index_copy_(0, where, values.reshape(-1).to(torch.float32))
        self.steps[row] = step
        self.written += 1

    def read(self) -> TraceRows:
        """The rows written since the last read (at most ``size``: older ones were overwritten), oldest first."""
        start = max(self.read_upto, self.written - self.size)
        positions = [i % self.size for i in range(start, self.written)]
        self.read_upto = self.written
        if not positions:
            return TraceRows(self.columns, [], [])
        rows = self.ring[torch.tensor(positions, device=self.ring.device)].tolist()  # one device->host copy
        return TraceRows(self.columns, [self.steps[p] for p in positions], rows)
