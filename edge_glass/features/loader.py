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
from typing import Callable, Iterator

import numpy as np
import torch

from edge_glass.features.block import FeatureBlock, flat_ranges
from edge_glass.features.store import FeatureSplit
from edge_glass.utils.errors import UserError
from edge_glass.utils.prefetch import prefetch


@dataclass
class _Plan:
    """One rank's order for one epoch."""

    samples: np.ndarray
    """Global sample indices in the order this rank consumes them."""
    block_of: np.ndarray
    """Index into `blocks` of each entry of `samples`."""
    rows: np.ndarray
    """Row of each entry within its block."""
    blocks: list[tuple[int, int]]
    """This rank's blocks as (global start, global stop), in reading order."""
    window_of_block: np.ndarray
    """Window number of each block; a window's blocks are read together."""
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
        block_size: int = 64,
        window_blocks: int = 8,
        prefetch_batches: int = 2,
        with_meta: bool = False,
        transform: Callable[[dict], dict] | None = None,
        pin_memory: bool = False,
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
        self.with_meta = with_meta  # the per-sample JSON, for tasks that need it (instruction data)
        # Runs on each batch in the prefetch thread, so per-batch CPU work such as tokenisation
        # overlaps the training step instead of adding to it.
        self.transform = transform
        # Page-locked batches (made in the prefetch thread) let the trainer's non_blocking copy
        # to the GPU overlap compute; from pageable memory the copy is synchronous.
        self.pin_memory = pin_memory
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out
        self._plans: dict[int, _Plan] = {}
        if drop_last and len(self) == 0:
            # Training cannot run on zero batches; evaluation (drop_last=False) may leave a rank
            # with nothing, and still joins the gathers.
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
        mine = [blocks[b] for b in per_rank[self.rank]]
        starts = np.array([a for a, _ in mine], dtype=np.int64)
        sizes_mine = np.array([b - a for a, b in mine], dtype=np.int64)
        samples, block_of, rows = [], [], []
        for w, first in enumerate(range(0, len(mine), self.window_blocks)):
            ids = np.arange(first, min(first + self.window_blocks, len(mine)))
            blk = np.repeat(ids, sizes_mine[ids])
            row = np.concatenate([np.arange(n) for n in sizes_mine[ids]])
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(len(blk))
                blk, row = blk[perm], row[perm]
            samples.append(starts[blk] + row)
            block_of.append(blk)
            rows.append(row)
        empty = [np.zeros(0, np.int64)]
        plan = _Plan(
            np.concatenate(samples or empty), np.concatenate(block_of or empty), np.concatenate(rows or empty),
            mine, np.arange(len(mine)) // self.window_blocks, num_batches,
        )
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

    def _windows(self, plan: _Plan, first_window: int) -> Iterator[dict[int, FeatureBlock]]:
        """Each window's blocks, read whole, in order: one read per block."""
        for w in range(first_window, int(plan.window_of_block.max()) + 1 if len(plan.blocks) else 0):
            yield {
                int(b): self.split.read(*plan.blocks[b], self.modalities, self.with_meta)
                for b in np.flatnonzero(plan.window_of_block == w)
            }

    def _batches(self, epoch: int, first: int) -> Iterator[dict]:
        plan = self._plan(epoch)
        if first >= plan.num_batches:
            return
        first_window = int(plan.window_of_block[plan.block_of[first * self.batch_size]])
        windows = self._windows(plan, first_window)
        loaded: dict[int, FeatureBlock] = {}
        for k in range(first, plan.num_batches):
            span = slice(k * self.batch_size, (k + 1) * self.batch_size)
            which, rows = plan.block_of[span], plan.rows[span]
            needed = np.unique(which)
            # Windows are consumed in order: drop the finished ones, pull the next as needed.
            low = plan.window_of_block[needed].min()
            loaded = {b: v for b, v in loaded.items() if plan.window_of_block[b] >= low}
            while not all(int(b) in loaded for b in needed):
                loaded.update(next(windows))
            yield gather(loaded, which, rows, self.modalities)

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader points at the next epoch."""
        epoch, first = self.epoch, self.batch
        batches = self._batches(epoch, first)
        if self.transform is not None:
            batches = map(self.transform, batches)
        if self.pin_memory:
            batches = map(pin_batch, batches)
        for batch in prefetch(batches, depth=self.prefetch_batches):
            self.batch += 1
            yield batch
        self.epoch, self.batch = epoch + 1, 0


def pin_batch(batch: dict) -> dict:
    """The batch with every tensor (nested one level) in page-locked memory."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.pin_memory() if isinstance(vv, torch.Tensor) else vv for kk, vv in v.items()}
        else:
            out[k] = v.pin_memory() if isinstance(v, torch.Tensor) else v
    return out


def gather(blocks: dict[int, FeatureBlock], which: np.ndarray, rows: np.ndarray, modalities: list[str]) -> dict:
    """The batch of samples (blocks[which[i]], rows[i]) collated: per modality `tokens` [B,T,D]
    (zero past each length), `mask` [B,T] and `pooled` [B,P].

    Samples are laid out grouped by source block (stable, so the order is still a function of
    the plan): each block then fills one contiguous slice of the output, which `np.take(...,
    out=)` writes with a single copy. Order within a batch means nothing to the losses, and this
    copy is the loader's main cost next to the read itself (benchmarks/loader.py).
    """
    # A batch draws on a handful of blocks: grouping by a per-block mask is cheaper than the
    # two sorts np.argsort + np.unique would do on every batch.
    groups = [np.flatnonzero(which == b) for b in sorted(set(which.tolist()))]
    order = np.concatenate(groups)
    which, rows = which[order], rows[order]
    bounds = np.cumsum([0] + [len(g) for g in groups])
    spans = [(int(which[lo]), int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    n = len(which)
    keys, captions, meta = [], [], []
    for b, lo, hi in spans:
        block = blocks[b]
        for r in rows[lo:hi]:
            keys.append(block.keys[r])
            captions.append(block.captions[r])
            meta.append(block.meta[r])
    batch: dict = {"keys": keys, "captions": captions, "meta": meta}
    for m in modalities:
        lengths = np.empty(n, dtype=np.int64)
        for b, lo, hi in spans:
            lengths[lo:hi] = blocks[b].modalities[m].lengths[rows[lo:hi]]
        t_max = int(lengths.max())
        first = blocks[spans[0][0]].modalities[m]
        dim = first.tokens.shape[1]
        fixed = bool((lengths == t_max).all())
        tokens = np.empty((n, t_max, dim), first.tokens.dtype) if fixed else np.zeros((n, t_max, dim), first.tokens.dtype)
        mask = np.arange(t_max)[None, :] < lengths[:, None]
        pooled = np.empty((n, first.pooled.shape[1]), first.pooled.dtype)
        for b, lo, hi in spans:
            arrays = blocks[b].modalities[m]
            r = rows[lo:hi]
            _take(arrays.pooled, r, pooled[lo:hi])
            if fixed and len(arrays.tokens) == len(arrays.pooled) * t_max:
                # Every sample of the block has t_max tokens: the flat rows are a [N, T, D] array.
                _take(arrays.tokens.reshape(-1, t_max, dim), r, tokens[lo:hi])
            else:
                # Flat source rows of these samples, in order, into the mask's True cells.
                src = flat_ranges(arrays.offsets[r], arrays.lengths[r])
                ii, tt = np.nonzero(mask[lo:hi])
                tokens[lo + ii, tt] = arrays.tokens[src]
        batch[m] = {"tokens": torch.from_numpy(tokens), "mask": torch.from_numpy(mask), "pooled": torch.from_numpy(pooled)}
    return batch


def _take(src: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = src[rows] in one copy. torch's index_select copies fp16 rows about 3x faster
    than np.take (measured 28 vs 10 GB/s here), and this copy is the loader's main cost."""
    torch.index_select(torch.from_numpy(src), 0, torch.from_numpy(rows), out=torch.from_numpy(out))
