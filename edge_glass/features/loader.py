"""`FeatureLoader`: deterministic, block-reading, rank-balanced, resumable batches from a store.

Order. Each epoch's order is a pure function of (seed, epoch): the split is cut into blocks of
`block_size` consecutive samples, the blocks are permuted and dealt to ranks round-robin, and
each rank shuffles its samples within windows of `window_blocks` blocks. Reading stays one slice
per block (tens of thousands of samples/s from HDF5, against ~2.5k/s sample by sample;
notes/cpu-stack.md §6) while batches still mix many distant parts of the split.

Balance. Every rank yields exactly the same number of batches (with `drop_last`): a rank that
runs one batch more than the others would wait forever in DeepSpeed's gradient all-reduce.

Resume. `state_dict()` is (epoch, batches consumed); a rebuilt loader given that state yields
exactly the batches the original would have yielded next, reading only what they need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from edge_glass.features.block import FeatureBlock, concat_blocks, pad_tokens
from edge_glass.features.store import FeatureSplit
from edge_glass.utils.errors import UserError
from edge_glass.utils.prefetch import prefetch


@dataclass
class _Plan:
    """One rank's order for one epoch."""

    samples: np.ndarray
    """Global sample indices in the order this rank consumes them."""
    window_of: np.ndarray
    """Window number of each entry of `samples`."""
    rows: np.ndarray
    """Row of each entry within its window's block, as `_read_window` lays it out."""
    windows: list[list[tuple[int, int]]]
    """Per window, its blocks as (global start, global stop)."""
    num_batches: int


class FeatureLoader:
    """Batches of padded token tensors, masks and pooled vectors, per modality."""

    def __init__(
        self,
        split: FeatureSplit,
        batch_size: int,
        *,
        modalities: list[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
        block_size: int = 32,
        window_blocks: int = 8,
        prefetch_batches: int = 2,
    ) -> None:
        if batch_size <= 0 or block_size <= 0 or window_blocks <= 0:
            raise ValueError("batch_size, block_size and window_blocks must be positive")
        self.split = split
        self.batch_size = batch_size
        self.modalities = modalities if modalities is not None else split.modalities
        missing = set(self.modalities) - set(split.modalities)
        if missing:
            raise UserError(f"{split.path} has no {', '.join(sorted(missing))} features (it has {', '.join(split.modalities)})")
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.block_size, self.window_blocks = block_size, window_blocks
        self.prefetch_batches = prefetch_batches
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out
        self._plans: dict[int, _Plan] = {}
        if len(self) == 0:
            raise UserError(
                f"{split.path}: {len(split)} samples in blocks of {block_size} give no full batch of {batch_size} "
                f"on each of {world_size} rank(s); lower data.micro_batch_size or data.read_block_size, or add data"
            )

    # ------------------------------------------------------------------ planning

    def _blocks(self) -> list[tuple[int, int]]:
        """Blocks never cross a shard boundary, so each is one read of one file."""
        blocks = []
        for start, size in zip(self.split.shard_starts[:-1], self.split.shard_sizes):
            for a in range(0, int(size), self.block_size):
                blocks.append((int(start) + a, int(start) + min(a + self.block_size, int(size))))
        return blocks

    def _plan(self, epoch: int) -> _Plan:
        if epoch in self._plans:
            return self._plans[epoch]
        blocks = self._blocks()
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(blocks))
        else:
            order = np.arange(len(blocks))
        per_rank = [order[r :: self.world_size] for r in range(self.world_size)]
        sizes = [sum(blocks[b][1] - blocks[b][0] for b in mine) for mine in per_rank]
        if self.drop_last:
            num_batches = min(sizes) // self.batch_size
        else:
            num_batches = -(-sizes[self.rank] // self.batch_size)
        mine = per_rank[self.rank]
        windows, samples, window_of, rows = [], [], [], []
        for w, first in enumerate(range(0, len(mine), self.window_blocks)):
            win = [blocks[b] for b in mine[first : first + self.window_blocks]]
            base = np.concatenate([np.arange(a, b) for a, b in win])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(len(base))
            else:
                perm = np.arange(len(base))
            windows.append(win)
            samples.append(base[perm])
            rows.append(perm)
            window_of.append(np.full(len(base), w))
        if not samples:
            samples, window_of, rows = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        plan = _Plan(np.concatenate(samples), np.concatenate(window_of), np.concatenate(rows), windows, num_batches)
        self._plans = {epoch: plan}  # keep only the current epoch's plan
        return plan

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank with drop_last)."""
        return self._plan(self.epoch).num_batches

    # ------------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_samples": len(self.split),
        }

    def load_state_dict(self, state: dict, reshard: bool = False) -> None:
        """Continue where `state` left off. With `reshard`, a state saved under another world
        size or batch size continues at the same fraction of its epoch (the order itself then
        differs, which is why it is not the default)."""
        mine = self.state_dict()
        for key in ("seed", "num_samples") + (() if reshard else ("batch_size", "world_size")):
            if state.get(key, mine[key]) != mine[key]:
                raise UserError(
                    f"loader state was saved with {key}={state[key]} but this run has {key}={mine[key]}; "
                    "the data order cannot be resumed exactly"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if reshard:
            consumed = self.batch * state["batch_size"] * state["world_size"]
            self.batch = min(consumed // (self.batch_size * self.world_size), len(self))

    # ------------------------------------------------------------------ iteration

    def _read_window(self, plan: _Plan, w: int) -> FeatureBlock:
        """The window's blocks back to back, one read each."""
        return concat_blocks([self.split.read(a, b, self.modalities) for a, b in plan.windows[w]])

    def _batches(self, epoch: int, first: int) -> Iterator[dict]:
        plan = self._plan(epoch)
        cache: dict[int, FeatureBlock] = {}
        for k in range(first, plan.num_batches):
            span = slice(k * self.batch_size, (k + 1) * self.batch_size)
            wins, rows = plan.window_of[span], plan.rows[span]
            parts = []
            for w in np.unique(wins):  # a batch straddles at most a window boundary or two
                if w not in cache:
                    cache = {kw: v for kw, v in cache.items() if kw >= w}  # earlier windows are done
                    cache[w] = self._read_window(plan, int(w))
                parts.append(cache[w].take(rows[wins == w]))
            yield collate(concat_blocks(parts))

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader points at the next epoch."""
        epoch, first = self.epoch, self.batch
        for batch in prefetch(self._batches(epoch, first), depth=self.prefetch_batches):
            self.batch += 1
            yield batch
        self.epoch, self.batch = epoch + 1, 0


def collate(block: FeatureBlock) -> dict:
    """A block as a training batch: per modality `tokens` [B,T,D], `mask` [B,T], `pooled` [B,P]."""
    batch: dict = {"keys": block.keys, "captions": block.captions, "meta": block.meta}
    for m, arrays in block.modalities.items():
        tokens, mask = pad_tokens(arrays)
        batch[m] = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens)),
            "mask": torch.from_numpy(mask),
            "pooled": torch.from_numpy(np.ascontiguousarray(arrays.pooled)),
        }
    return batch
