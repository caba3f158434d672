"""`FeatureLoader`: deterministic, rank-balanced, resumable batches from a store, at the rate the
machine can copy bytes.

Order: a pure function of (seed, epoch), planned window by window (epoch_plan.py).

Resume. `state_dict()` is (epoch, batches consumed); a rebuilt loader given that state yields
exactly the batches the original would have yielded next, reading only what they need. Batch k's
content depends on the plan alone, never on which thread made it or when.

Reading. A block's strings, token lengths and pooled vectors are read once (one slice each) when
the first batch that needs the block is made; token rows, the bulk of the bytes, go from the file
straight into the batch with one `pread` per sample (hdf5_shard.py): one copy, by the kernel,
outside the GIL, on no thread pool shared with anything else. (The previous loader gathered with
torch's `index_select`, which runs on torch's intra-op thread pool: 37 GB/s on one idle thread,
1.4 GB/s when other processes share the cores, which on a GPU box running 8 ranks they always do.)

Parallelism. `reader_threads` threads each make whole batches (batch k by thread k mod n), and the
consumer takes them in order; batches are made into a ring of reusable buffers (batch_buffers.py),
page-locked for a GPU so the trainer's `non_blocking` copy overlaps compute. A slot is refilled
only after its previous batch has been handed back, which is when the consumer asks for the next
one: a batch is valid until then (and, on a GPU, until the copy queued before that moment ends).
Loaders that hand batches to code that may keep them (evaluation, notebooks) leave
`reuse_buffers` off and get fresh arrays each batch.

Resources. At most `split`'s `max_open_shards` files are open; a block's metadata is dropped when
the last batch drawing from its window has been consumed, and with `release_pages` the block's
bytes are dropped from the page cache too (for a split larger than memory, which would only push
everything else out of the cache and be read from disk next epoch anyway).
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import weakref
from typing import Callable, Iterator

import numpy as np
import torch

from edge_glass.features.batch_buffers import BatchBuffers
from edge_glass.features.block import BlockIndex
from edge_glass.features.epoch_plan import EpochPlan
from edge_glass.features.store import FeatureSplit
from edge_glass.utils.errors import UserError


def default_reader_threads() -> int:
    """The cores this rank's share of the machine has, 1 to 8. Readers spend their time in the
    kernel's copy (GIL released) and sleep once the prefetch ring is full, so they take from
    the training step only what it leaves idle; one thread copies ~8 GB/s from the page cache,
    which a GPU step of 256 ViT-L/14-336 samples (300 MB) at 10 steps/s already exceeds."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // max(ranks, 1)))


def split_bytes(split: FeatureSplit) -> int:
    """Bytes of the split's files of the backend being read (from the manifest)."""
    return int(split.shard_bytes.clip(min=0).sum())


def machine_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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
        reader_threads: int | None = None,
        reuse_buffers: bool = False,
        release_pages: bool | None = False,
        with_meta: bool = False,
        transform: Callable[[dict], dict] | None = None,
        pin_memory: bool = False,
    ) -> None:
        """`reader_threads` None: `default_reader_threads()`. `release_pages` None: release when
        the split is larger than half the machine's memory."""
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
        self.reader_threads = default_reader_threads() if reader_threads is None else reader_threads
        if self.reader_threads <= 0:
            raise ValueError("reader_threads must be positive")
        self.reuse_buffers = reuse_buffers
        if release_pages is None:
            memory = machine_memory()
            release_pages = memory is not None and split_bytes(split) > memory // 2
        self.release_pages = release_pages
        self.with_meta = with_meta  # the per-sample JSON, for tasks that need it (instruction data)
        # Runs on each batch in the reader thread, so per-batch CPU work such as tokenisation
        # overlaps the training step instead of adding to it.
        self.transform = transform
        self.pin_memory = pin_memory
        self._layouts = {m: split.token_layout(m) for m in self.modalities}
        self._dequant: dict[str, dict] = {}
        for m, layout in self._layouts.items():
            if layout.quantized:
                center, spread = (torch.from_numpy(a) for a in split.dequant_params(m))
                if pin_memory:
                    center, spread = center.pin_memory(), spread.pin_memory()
                self._dequant[m] = {"center": center, "spread": spread, "quant": layout.dtype}
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already handed out
        self._plan_cache: EpochPlan | None = None
        # The ring of reused buffers lives as long as the loader: a fresh buffer's pages are
        # zero-filled on first touch, which made a cold ring gather at a quarter of the warm rate.
        self._ring: list[BatchBuffers] = []
        if drop_last and len(self) == 0:
            # Training cannot run on zero batches; evaluation (drop_last=False) may leave a rank
            # with nothing, and still joins the gathers.
            raise UserError(
                f"{split.path}: {len(split)} samples in blocks of {block_size} give no full batch of {batch_size} "
                f"on each of {world_size} rank(s); lower data.micro_batch_size or data.read_block_size, or add data"
            )

    # ------------------------------------------------------------------ planning and state

    def _plan(self, epoch: int) -> EpochPlan:
        if self._plan_cache is None or self._plan_cache.epoch != epoch:
            self._plan_cache = EpochPlan(
                self.split.shard_sizes, self.block_size, self.window_blocks, self.batch_size, seed=self.seed,
                epoch=epoch, rank=self.rank, world_size=self.world_size, shuffle=self.shuffle, drop_last=self.drop_last,
            )
        return self._plan_cache

    def __len__(self) -> int:
        """Batches per epoch on this rank (equal on every rank with drop_last)."""
        return self._plan(self.epoch).num_batches

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

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader points at the next epoch."""
        epoch, first = self.epoch, self.batch
        plan = self._plan(epoch)
        blocks = _WindowCache(self.split, plan, self.modalities, self.with_meta, self.release_pages)
        if self.prefetch_batches <= 0:
            for k in range(first, plan.num_batches):
                batch = self._make(plan, k, blocks, self.ring(1)[0] if self.reuse_buffers else BatchBuffers(self.pin_memory))
                self.batch += 1
                yield batch
                blocks.consumed(k)
        else:
            with _Readers(self, plan, first, blocks) as readers:
                for k in range(first, plan.num_batches):
                    batch = readers.get(k)
                    self.batch += 1
                    yield batch
                    readers.release(k)
        self.epoch, self.batch = epoch + 1, 0

    def ring(self, slots: int) -> list[BatchBuffers]:
        """At least `slots` reusable batch buffers (the same ones epoch after epoch)."""
        while len(self._ring) < slots:
            self._ring.append(BatchBuffers(self.pin_memory))
        return self._ring

    def _make(self, plan: EpochPlan, k: int, blocks: "_WindowCache", buffers: BatchBuffers) -> dict:
        batch = gather(plan, k, blocks, buffers, self._layouts, self._dequant)
        return self.transform(batch) if self.transform is not None else batch


def gather(plan: EpochPlan, k: int, blocks: "_WindowCache", buffers: BatchBuffers, layouts: dict, dequant: dict) -> dict:
    """Batch k collated into `buffers`: per modality `tokens` [B, T, W] as stored (zero past each
    length, written by the backends' `copy_many`), `mask` [B, T], `pooled` [B, P], and for a
    quantised store `scales` [B, T, G] with what `quantize.dequantize_features` needs."""
    which, rows = plan.batch(k)
    index: dict[int, BlockIndex] = {}
    for w in plan.batch_windows(k):
        index.update(blocks.window(w))
    n = len(rows)
    # Samples laid out grouped by source block (stable, so the order is still a function of the
    # plan): each block fills one contiguous run of the batch, which its backend copies with one
    # lookup, and for rows held in memory one `np.take`. Order within a batch means nothing to
    # the losses.
    order = which.argsort(kind="stable")
    which, rows = which[order], rows[order]
    cuts = np.flatnonzero(np.diff(which)) + 1
    bounds = np.concatenate([[0], cuts, [n]]).tolist() if n else [0]
    groups = [(int(which[lo]), rows[lo:hi], lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    which_l, rows_l = which.tolist(), rows.tolist()
    batch: dict = {
        "keys": [index[b].keys[r] for b, r in zip(which_l, rows_l)],
        "captions": [index[b].captions[r] for b, r in zip(which_l, rows_l)],
        "meta": [index[b].meta[r] for b, r in zip(which_l, rows_l)],
    }
    for m, layout in layouts.items():
        lengths = np.empty(n, dtype=np.int64)
        for b, r, lo, hi in groups:
            lengths[lo:hi] = index[b].lengths[m][r]
        t_max = int(lengths.max()) if n else 0
        tokens, tokens_t = buffers.get(f"{m}.tokens", (n, t_max, layout.stored_width), layout.stored_dtype)
        scales = scales_t = None
        if layout.quantized:
            scales, scales_t = buffers.get(f"{m}.scales", (n, t_max, layout.scale_width), np.float16)
        for b, r, lo, hi in groups:
            index[b].copy_many(m, r, tokens[lo:hi], None if scales is None else scales[lo:hi])
        mask, mask_t = buffers.get(f"{m}.mask", (n, t_max), np.bool_)
        np.less(np.arange(t_max), lengths[:, None], out=mask)
        first = index[groups[0][0]].pooled[m] if n else np.zeros((0, 0), np.float16)
        pooled, pooled_t = buffers.get(f"{m}.pooled", (n, first.shape[1]), first.dtype)
        for b, r, lo, hi in groups:
            index[b].pooled[m].take(r, axis=0, out=pooled[lo:hi], mode="clip")
        entry = {"tokens": tokens_t, "mask": mask_t, "pooled": pooled_t}
        if layout.quantized:
            entry.update(scales=scales_t, **dequant[m])
        batch[m] = entry
    return batch


class _WindowCache:
    """The `BlockIndex`es of the windows batches in flight draw from, each read once, shared by
    the reader threads, dropped when the consumer is past the window's last batch."""

    def __init__(self, split: FeatureSplit, plan: EpochPlan, modalities: list[str], with_meta: bool,
                 release_pages: bool) -> None:
        self.split, self.plan, self.modalities, self.with_meta = split, plan, modalities, with_meta
        self.release_pages = release_pages
        self._windows: dict[int, _Pending] = {}
        self._lock = threading.Lock()

    def window(self, w: int) -> dict[int, BlockIndex]:
        with self._lock:
            entry = self._windows.get(w)
            mine = entry is None
            if mine:
                entry = self._windows[w] = _Pending()
        if mine:
            try:
                entry.value = {
                    b: self.split.read_index(*map(int, self.plan.blocks[b]), self.modalities, self.with_meta)
                    for b in self.plan.window_blocks_of(w)
                }
            except BaseException as e:
                entry.error = e
                with self._lock:
                    self._windows.pop(w, None)  # a later attempt reads it afresh
            finally:
                entry.ready.set()
        return entry.result()

    def consumed(self, k: int) -> None:
        """Batch k has been consumed: drop the windows no later batch draws from."""
        with self._lock:
            done = [w for w in self._windows if self.plan.last_batch_of_window(w) <= k]
            dropped = [self._windows.pop(w) for w in done]
        if self.release_pages:
            for entry in dropped:
                if entry.ready.is_set() and entry.error is None:
                    for block in entry.value.values():
                        block.release_pages()


class _Pending:
    """A value one thread computes and others wait for."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value = None
        self.error: BaseException | None = None

    def result(self):
        self.ready.wait()
        if self.error is not None:
            raise self.error
        return self.value


class _Readers:
    """`loader.reader_threads` threads making batches first.. of `plan` into a ring of buffers;
    `get(k)` hands them out in order, `release(k)` takes batch k's buffers back."""

    def __init__(self, loader: FeatureLoader, plan: EpochPlan, first: int, blocks: _WindowCache) -> None:
        self.loader, self.plan, self.first, self.blocks = loader, plan, first, blocks
        n = self.threads = max(1, min(loader.reader_threads, plan.num_batches - first))
        depth = max(1, -(-loader.prefetch_batches // n))
        self._queues = [queue.Queue(maxsize=depth) for _ in range(n)]
        # Slots: every batch that can be alive at once (the consumer's, and per thread the
        # queued ones and the one being made) has its own; batch k uses slot k mod slots.
        self.slots = n * (depth + 1) + 1
        self._buffers = loader.ring(self.slots) if loader.reuse_buffers else None
        self._events: list = [None] * self.slots
        self._released = first - 1  # every batch <= this has been handed back
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"feature-reader-{i}", daemon=True)
                         for i in range(n)]

    def __enter__(self) -> "_Readers":
        _LIVE.add(self)
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """The consumer finished or went away (break, exception, closed generator, exit): stop
        the threads; one blocked in a put or a wait notices within its timeout."""
        self._stop.set()
        if sys.is_finalizing():
            # Daemon threads are frozen now, possibly holding our lock: waiting would hang.
            return
        if self._cond.acquire(timeout=1):
            self._cond.notify_all()
            self._cond.release()
        for t in self._threads:
            t.join(timeout=10)
        _LIVE.discard(self)

    def _run(self, i: int) -> None:
        for k in range(self.first + i, self.plan.num_batches, self.threads):
            try:
                buffers = self._slot(k)
                if buffers is None:
                    return
                item = self.loader._make(self.plan, k, self.blocks, buffers)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = _Raised(e)
            while not self._stop.is_set():
                try:
                    self._queues[i].put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, _Raised):
                return

    def _slot(self, k: int) -> BatchBuffers | None:
        """Batch k's buffers, once the batch that used them last has been handed back."""
        if self._buffers is None:
            return BatchBuffers(self.loader.pin_memory)
        slot = k % self.slots
        with self._cond:
            while self._released < k - self.slots and not self._stop.is_set():
                self._cond.wait(timeout=0.1)
            if self._stop.is_set():
                return None
            event = self._events[slot]
        if event is not None:
            event.synchronize()  # the device copy queued from this slot has finished
        return self._buffers[slot]

    def get(self, k: int) -> dict:
        q = self._queues[(k - self.first) % self.threads]
        item = q.get()
        if isinstance(item, _Raised):
            raise item.error
        return item

    def release(self, k: int) -> None:
        event = None
        if self._buffers is not None and self.loader.pin_memory and torch.cuda.is_available():
            # Whatever the consumer queued on the device from batch k (its copy) is before this
            # event; the slot is refilled only after it completes.
            event = torch.cuda.current_stream().record_event()
        with self._cond:
            self._events[k % self.slots] = event
            self._released = k
            self._cond.notify_all()
        self.blocks.consumed(k)


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


# Readers of loaders whose iteration was left unfinished (a training loop that stops at
# max_steps mid-epoch, a notebook cell): stopped at exit while their threads can still run.
# Left to garbage collection during interpreter shutdown, their daemon threads would already
# be frozen, possibly holding a lock (ours, or h5py's, which its own exit handler then needs).
_LIVE: "weakref.WeakSet[_Readers]" = weakref.WeakSet()


@atexit.register
def _stop_live_readers() -> None:
    for readers in list(_LIVE):
        readers.stop()
