"""`FeatureBlock`: the in-memory form of a run of consecutive samples of one feature shard.

A whole shard (as the extractor writes it) and a slice of one (as the loader reads it) are the
same thing, so both backends write from and read into this one type.

Token sequences have different true lengths per sample (audio frames, word pieces). They are
kept *flat*, `tokens[offsets[i]:offsets[i+1]]` being sample i, rather than padded to the longest
sample: on disk a padded layout would store a 30-s clip's 1500 frames of zeros next to every
1-s clip, while flat storage is exact and still reads any run of samples with one contiguous
slice. Padding happens per batch, in `pad_tokens`, to the batch's own longest sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModalityArrays:
    """One modality's features for a run of samples."""

    tokens: np.ndarray
    """[sum of lengths, D] token rows of all samples, back to back."""
    offsets: np.ndarray
    """[N + 1] int64 starting at 0; sample i owns rows offsets[i]:offsets[i+1]."""
    pooled: np.ndarray
    """[N, P] pooled vector per sample."""

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, index: np.ndarray) -> "ModalityArrays":
        """The samples at `index` (any order), re-packed flat."""
        lengths = self.lengths[index]
        rows = flat_ranges(self.offsets[index], lengths)
        offsets = np.zeros(len(index) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return ModalityArrays(self.tokens[rows], offsets, self.pooled[index])


@dataclass
class FeatureBlock:
    """Features and metadata of N consecutive samples."""

    keys: list[str]
    captions: list[str]
    meta: list[str]
    """Per-sample JSON text of the raw sample's metadata (source, QA pairs, ids)."""
    modalities: dict[str, ModalityArrays] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray) -> "FeatureBlock":
        return FeatureBlock(
            [self.keys[i] for i in index],
            [self.captions[i] for i in index],
            [self.meta[i] for i in index],
            {m: a.take(index) for m, a in self.modalities.items()},
        )


def concat_blocks(blocks: list[FeatureBlock]) -> FeatureBlock:
    """One block holding `blocks` back to back (offsets rebased)."""
    if len(blocks) == 1:
        return blocks[0]
    modalities = {}
    for m in blocks[0].modalities:
        parts = [b.modalities[m] for b in blocks]
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        modalities[m] = ModalityArrays(
            np.concatenate([p.tokens for p in parts]), offsets, np.concatenate([p.pooled for p in parts])
        )
    return FeatureBlock(
        [k for b in blocks for k in b.keys],
        [c for b in blocks for c in b.captions],
        [j for b in blocks for j in b.meta],
        modalities,
    )


def pad_tokens(arrays: ModalityArrays) -> tuple[np.ndarray, np.ndarray]:
    """Padded [N, Tmax, D] tokens (zeros past each length) and the [N, Tmax] bool mask."""
    lengths = arrays.lengths
    n, dim = len(lengths), arrays.tokens.shape[1]
    t_max = int(lengths.max()) if n else 0
    if n and (lengths == t_max).all():
        # Fixed-length tokens (CLIP patches): the flat rows already are the padded tensor.
        return arrays.tokens.reshape(n, t_max, dim), np.ones((n, t_max), dtype=bool)
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    padded = np.zeros((n, t_max, dim), dtype=arrays.tokens.dtype)
    # Row-major order of the mask's True cells is exactly the flat order of the rows.
    padded[mask] = arrays.tokens
    return padded, mask


def flat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + l) for each (s, l), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # Position of each output row within its run, plus the run's start.
    run_starts = np.repeat(np.asarray(starts, dtype=np.int64), lengths)
    first = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    within = np.arange(total, dtype=np.int64) - np.repeat(first, lengths)
    return run_starts + within
