"""Per-dimension mean and std of a feature field over a split, accumulated shard by shard.

Adapters z-score their inputs with the train split's statistics: a random or real encoder's
outputs can carry large per-dimension offsets (a tiny random Whisper's frames are ~99 %
positional embedding), and without standardisation the contrastive
loss sat at chance for most of a minute. The sums are float64 and merged in shard order, so the
result does not depend on how many ranks did the extraction.
"""

from __future__ import annotations

import numpy as np
import torch


class RunningMoments:
    """Count, sum and sum of squares per dimension."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sumsq = np.zeros(dim, dtype=np.float64)

    def add(self, count: int, total: np.ndarray, total_sq: np.ndarray) -> None:
        """Fold in the sums of `count` more rows (see `row_sums`)."""
        self.count += count
        self.sum += total
        self.sumsq += total_sq

    def update(self, rows: np.ndarray) -> None:
        sums = row_sums(torch.from_numpy(np.ascontiguousarray(rows))).numpy()
        self.add(int(sums[0, 0]), sums[1], sums[2])

    def merge(self, other: "RunningMoments") -> None:
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.sum / max(self.count, 1)
        var = np.maximum(self.sumsq / max(self.count, 1) - np.square(mean), 0.0)
        return mean, np.sqrt(var)

    def to_json(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "RunningMoments":
        m = cls(len(data["sum"]))
        m.count = int(data["count"])
        m.sum = np.asarray(data["sum"], dtype=np.float64)
        m.sumsq = np.asarray(data["sumsq"], dtype=np.float64)
        return m


def row_sums(rows: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[3, D] float64 on the rows' device: the row count (in every column), the per-dimension
    sum and the sum of squares of `rows` [N, D], over the rows where `keep` is true (all by
    default; a sample left out for non-finite values must not make the statistics NaN).
    Computed where the rows are (the extraction's device), so only 3 x D numbers travel to the
    host per batch."""
    x = rows.double()
    if keep is None:
        count = torch.full_like(x[:1].sum(0), float(x.shape[0]))
    else:
        x = torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        count = keep.double().sum().expand(x.shape[1])
    return torch.stack([count, x.sum(0), (x * x).sum(0)])
