"""The in-memory forms of a run of consecutive samples of one feature shard.

`FeatureBlock` holds everything, token rows included: what the extractor writes and what
`FeatureSplit.read` gives notebooks and scripts. `BlockIndex` holds everything *but* the token
rows: what the training loader keeps of a block between reading it and gathering batches from
it; each backend's `copy_many` then puts samples' rows straight into the batch buffer.

Token sequences have different true lengths per sample (audio frames, word pieces). They are
kept *flat*, `tokens[offsets[i]:offsets[i+1]]` being sample i, rather than padded to the longest
sample: on disk a padded layout would store a 30-s clip's 1500 frames of zeros next to every
1-s clip, while flat storage is exact and still reads any sample's rows with one contiguous read.
Padding happens per batch, to the batch's own longest sample.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModalityArrays:
    """One modality's features for a run of samples."""

    tokens: np.ndarray
    """[sum of lengths, W] token rows of all samples, back to back, in the stored dtype (float,
    or int8 / packed int4 codes; see quantize.py)."""
    offsets: np.ndarray
    """[N + 1] int64 starting at 0; sample i owns rows offsets[i]:offsets[i+1]."""
    pooled: np.ndarray
    """[N, P] pooled vector per sample."""
    scales: np.ndarray | None = None
    """[sum of lengths, G] float16 scales of quantised token rows; None for float tokens."""

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


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
        scales = None if parts[0].scales is None else np.concatenate([p.scales for p in parts])
        modalities[m] = ModalityArrays(
            np.concatenate([p.tokens for p in parts]), offsets, np.concatenate([p.pooled for p in parts]), scales
        )
    return FeatureBlock(
        [k for b in blocks for k in b.keys],
        [c for b in blocks for c in b.captions],
        [j for b in blocks for j in b.meta],
        modalities,
    )


class BlockIndex(ABC):
    """A block of samples without its token rows (see the module docstring)."""

    keys: list[str]
    captions: list[str]
    meta: list[str]
    """Per-sample JSON text, or "" each when read without metadata."""
    lengths: dict[str, np.ndarray]
    """Per modality: [N] token count of each sample."""
    pooled: dict[str, np.ndarray]
    """Per modality: [N, P] pooled vectors."""

    def __len__(self) -> int:
        return len(self.keys)

    @abstractmethod
    def copy_many(self, modality: str, samples: np.ndarray, tokens: np.ndarray, scales: np.ndarray | None) -> None:
        """Samples `samples` (indices into this block) into `tokens[k, :length]` for each k, and
        for a quantised store their scales into `scales[k, :length]`: `tokens` is the part of
        the batch buffer these samples fill. One copy from the store, no intermediate buffer
        (for rows held in memory, one copy from there). Rows past a sample's length are zeroed
        here too, while the sample's part of the buffer is at hand: the buffers are reused."""

    def release_pages(self) -> None:
        """Ask the OS to drop this block's bytes from the page cache (the loader is done with it)."""


def copy_rows(rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, samples: np.ndarray, out: np.ndarray,
              zero_row: int | None = None) -> None:
    """out[k, :lengths[s]] = rows[starts[s] : starts[s] + lengths[s]] and out[k, lengths[s]:] = 0
    for s = samples[k]: token rows held in memory (a block read whole) into a batch buffer,
    padding included (the buffers are reused, so it must be written).

    When every sample of the block has the same length and fills the buffer's rows, it is one
    `np.take` (mode "clip": the default "raise" mode copies through a temporary, at a third of
    the speed). Otherwise, given `zero_row` (the index of an all-zero row of `rows`), it is one
    `np.take` of a flat row index whose padding slots point at that row, instead of a Python
    loop of two slice assignments per sample."""
    t = out.shape[1]
    block_rows = len(rows) - (zero_row is not None)
    if len(lengths) and t and (lengths == t).all() and block_rows == len(lengths) * t:
        np.take(rows[:block_rows].reshape(len(lengths), t, -1), samples, axis=0, out=out, mode="clip")
        return
    if zero_row is not None and len(samples) and t:
        steps = np.arange(t)
        index = starts[samples][:, None] + steps
        index[steps >= lengths[samples][:, None]] = zero_row
        np.take(rows, index.reshape(-1), axis=0, out=out.reshape(len(samples) * t, *out.shape[2:]), mode="clip")
        return
    for k, s in enumerate(samples.tolist()):
        a, n = int(starts[s]), int(lengths[s])
        out[k, :n] = rows[a : a + n]
        out[k, n:] = 0
