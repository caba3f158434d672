"""Per-dimension mean and std of a feature field over a split, accumulated shard by shard.

Adapters z-score their inputs with the train split's statistics: a random or real encoder's
outputs can carry large per-dimension offsets (a tiny random Whisper's frames are ~99 %
positional embedding; notes/learnability.md), and without standardisation the contrastive
loss sat at chance for most of a minute. The sums are float64 and merged in shard order, so the
result does not depend on how many ranks did the extraction.
"""

from __future__ import annotations

import numpy as np


class RunningMoments:
    """Count, sum and sum of squares per dimension."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sumsq = np.zeros(dim, dtype=np.float64)

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0)
        self.sumsq += np.square(rows).sum(axis=0)

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
