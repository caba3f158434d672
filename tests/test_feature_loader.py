"""`FeatureLoader` (edge_glass.features.loader): exact resume from `state_dict()` (mid-epoch and
across an epoch boundary, on both backends and on a non-zero rank), equal and disjoint work per
rank, order a pure function of (seed, epoch), `len()` true, an unshuffled pass that is the store
in order, and padded batches whose masks and values are the store's per-sample arrays.

The train split has 128 samples in shards of 24 (and a last one of 8); with block_size 10 the
blocks are uneven (10, 10, 4 per shard) and batches of 7 straddle blocks and windows.

Run with:
    python -m pytest tests/test_feature_loader.py -q
"""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch
from helpers.feature_world import feature_world

from edge_glass.features import hdf5_shard
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import open_store
from edge_glass.utils.errors import UserError

BATCH = 7
MODALITIES = ("audio", "text", "vision")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


def make_loader(world, backend="hdf5", **kw) -> FeatureLoader:
    """A loader on a freshly opened split (as a restarted run would have)."""
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("block_size", 10)
    kw.setdefault("window_blocks", 2)
    return FeatureLoader(open_store(world.store, "train", backend=backend), **kw)


def take(loader: FeatureLoader, k: int) -> list[dict]:
    """The loader's next k batches, running on into later epochs as a training loop does."""
    out: list[dict] = []
    while len(out) < k:
        for batch in loader:
            out.append(batch)
            if len(out) == k:
                break
    return out


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"] and x["meta"] == y["meta"]
        for m in MODALITIES:
            for t in ("tokens", "mask", "pooled"):
                assert torch.equal(x[m][t], y[m][t]), (x["keys"], m, t)


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


# --- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,rank,world_size", [("hdf5", 0, 1), ("webdataset", 0, 1), ("hdf5", 1, 2), ("webdataset", 0, 2)]
)
def test_resume_yields_exactly_the_uninterrupted_batches(world, backend, rank, world_size):
    kw = dict(backend=backend, rank=rank, world_size=world_size, seed=3)
    per_epoch = len(make_loader(world, **kw))
    assert per_epoch >= 4
    # Saved mid-epoch 0, and mid-epoch 1 with the resumed run going on into epoch 2.
    for consumed, then in [(3, per_epoch - 3 + 2), (per_epoch + 2, per_epoch + 1)]:
        reference = take(make_loader(world, **kw), consumed + then)

        first = make_loader(world, **kw)
        assert_same_batches(take(first, consumed), reference[:consumed])
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a checkpoint file
        assert (state["epoch"], state["batch"]) == divmod(consumed, per_epoch)

        resumed = make_loader(world, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, then), reference[consumed:])


def _cloned(loader: FeatureLoader, k: int) -> list[dict]:
    """The next k batches, each copied before the next is asked for (reused buffers are
    refilled after that)."""
    out = []
    while len(out) < k:
        for batch in loader:
            out.append({key: ({kk: vv.clone() for kk, vv in v.items()} if isinstance(v, dict) else list(v))
                        for key, v in batch.items()})
            if len(out) == k:
                break
    return out


@pytest.mark.parametrize("backend", ["hdf5", "webdataset"])
def test_reader_threads_and_reused_buffers_change_nothing_and_resume_exactly(world, backend):
    per_epoch = len(make_loader(world, backend=backend))
    total = per_epoch + 3
    reference = take(make_loader(world, backend=backend, prefetch_batches=0), total)
    for threads in (1, 3):
        kw = dict(backend=backend, reader_threads=threads, prefetch_batches=4, reuse_buffers=True)
        assert_same_batches(_cloned(make_loader(world, **kw), total), reference)
        # A run with 1 thread saved after 5 batches, resumed with 3 (and the reverse).
        first = make_loader(world, **kw)
        _cloned(first, 5)
        resumed = make_loader(world, **{**kw, "reader_threads": 4 - threads})
        resumed.load_state_dict(first.state_dict())
        assert_same_batches(_cloned(resumed, total - 5), reference[5:])


def test_reused_buffers_are_refilled_only_after_the_next_batch_is_asked_for(world):
    loader = make_loader(world, reader_threads=2, prefetch_batches=2, reuse_buffers=True)
    batches = iter(loader)
    first = next(batches)
    snapshot = first["vision"]["tokens"].clone()
    import time

    time.sleep(0.5)  # the reader threads run ahead meanwhile, but may not touch batch 0's buffers
    assert torch.equal(first["vision"]["tokens"], snapshot)
    batches.close()


def test_state_from_another_world_size_is_refused(world):
    two = make_loader(world, rank=0, world_size=2)
    take(two, 2)
    one = make_loader(world)
    with pytest.raises(UserError, match="world_size=2"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(UserError, match="seed"):
        make_loader(world, seed=1).load_state_dict(make_loader(world, seed=0).state_dict())


def test_both_backends_give_identical_batches(world):
    assert_same_batches(take(make_loader(world, "hdf5"), 12), take(make_loader(world, "webdataset"), 12))


# --- ranks, order, length -----------------------------------------------------------------------


def test_two_ranks_get_equal_disjoint_full_batches(world):
    ranks = [make_loader(world, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for epoch in range(3):
        batches = [list(loader) for loader in ranks]
        assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == len(ranks[1]) > 0
        for per_rank in batches:
            assert all(len(b["keys"]) == BATCH for b in per_rank)
            for m in MODALITIES:
                assert all(b[m]["pooled"].shape[0] == BATCH for b in per_rank)
        k0, k1 = keys_of(batches[0]), keys_of(batches[1])
        assert len(set(k0)) == len(k0) and len(set(k1)) == len(k1)
        assert not set(k0) & set(k1), f"epoch {epoch}: a sample went to both ranks"
        assert ranks[0].state_dict()["epoch"] == epoch + 1


def _epoch_keys(world, seed: int, epoch: int, **kw) -> list[str]:
    loader = make_loader(world, seed=seed, **kw)
    loader.set_epoch(epoch)
    return keys_of(list(loader))


def test_order_is_a_function_of_seed_and_epoch(world):
    for kw in ({}, {"rank": 1, "world_size": 2}):
        base = _epoch_keys(world, 0, 1, **kw)
        assert base == _epoch_keys(world, 0, 1, **kw)
        assert base != _epoch_keys(world, 0, 2, **kw)
        assert base != _epoch_keys(world, 1, 1, **kw)
    # set_epoch(e) gives what running through to epoch e gives.
    loader = make_loader(world, seed=0)
    list(loader)
    assert keys_of(list(loader)) == _epoch_keys(world, 0, 1)
    # Shuffled means shuffled: not the store order, and mixing samples of different shards.
    first = take(make_loader(world, seed=0), 1)[0]["keys"]
    assert first != sorted(first)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("rank,world_size", [(0, 1), (0, 2), (1, 2)])
def test_len_is_the_number_of_batches_yielded(world, drop_last, rank, world_size):
    loader = make_loader(world, drop_last=drop_last, rank=rank, world_size=world_size)
    for _ in range(2):
        expected = len(loader)
        batches = list(loader)
        assert len(batches) == expected
        sizes = [len(b["keys"]) for b in batches]
        if drop_last:
            assert set(sizes) == {BATCH}
        else:
            assert all(s == BATCH for s in sizes[:-1]) and 0 < sizes[-1] <= BATCH
    if world_size == 1 and not drop_last:
        assert sum(sizes) == 128


def test_unshuffled_single_rank_pass_is_the_store_in_order(world):
    split = open_store(world.store, "train")
    loader = make_loader(world, shuffle=False, drop_last=False)
    batches = list(loader)
    keys = keys_of(batches)
    assert keys == split.read(0, len(split)).keys == [f"train-{i:08d}" for i in range(128)]
    assert len(batches) == -(-128 // BATCH)


# --- batch contents -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend,rows_read", [("hdf5", "per block"), ("hdf5", "per sample"), ("webdataset", "per block")])
@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_padded_batches_hold_the_stored_values(world, backend, rows_read, reuse_buffers, monkeypatch):
    """Each batch as the consumer gets it. With reused buffers the check runs in a second epoch,
    so every slot already holds an earlier batch of other lengths: the padding must be written,
    not found zero. HDF5 reads small token rows a block at a time and large ones a sample at a
    time (one pread each); forcing the second covers that path at these tiny shapes."""
    if rows_read == "per sample":
        monkeypatch.setattr(hdf5_shard, "STAGE_BYTES_PER_SAMPLE", 0)
    split = open_store(world.store, "train", backend="hdf5")
    stored = {s["key"]: s for s in split}
    lengths_seen = set()
    loader = make_loader(world, backend, drop_last=False, seed=1, reuse_buffers=reuse_buffers, reader_threads=2)
    if reuse_buffers:
        for _ in loader:  # dirties the ring
            pass
    checked = 0
    for batch in loader:
        checked += 1
        for m in MODALITIES:
            tokens, mask, pooled = batch[m]["tokens"], batch[m]["mask"], batch[m]["pooled"]
            assert tokens.dtype == pooled.dtype == torch.float16 and mask.dtype == torch.bool
            assert tokens.shape[:2] == mask.shape and tokens.shape[0] == len(batch["keys"])
            longest = 0
            for i, key in enumerate(batch["keys"]):
                want = stored[key][f"{m}_tokens"]
                n = len(want)
                longest = max(longest, n)
                lengths_seen.add((m, n))
                # The mask is true exactly on the first `length` positions ...
                assert mask[i, :n].all() and not mask[i, n:].any()
                # ... which hold the stored rows, and everything after is zero.
                assert torch.equal(tokens[i, :n], torch.from_numpy(want))
                assert not tokens[i, n:].any(), (key, m, n)
                assert torch.equal(pooled[i], torch.from_numpy(stored[key][f"{m}_pooled"]))
            assert tokens.shape[1] == longest  # padded to the batch's own longest sample
            assert batch["captions"] == [stored[k]["caption"] for k in batch["keys"]]
    assert checked == len(loader) > 3
    # The lengths really vary, so padding was exercised, not just the fixed-length path.
    assert len({n for m, n in lengths_seen if m == "text"}) > 1


def test_a_rank_left_without_blocks_fails_cleanly(world):
    # val has 16 samples: one block of the default size 32, so rank 1 of 2 gets nothing to read.
    # That may be refused (UserError, as rank 0 does with drop_last) or give no batches, but it
    # must not crash with an internal error.
    for drop_last in (True, False):
        for rank in (0, 1):
            try:
                loader = FeatureLoader(open_store(world.store, "val"), 4, rank=rank, world_size=2, drop_last=drop_last)
                batches = list(loader)
            except UserError:
                continue
            assert len(batches) == len(loader)


def test_a_process_that_leaves_an_epoch_unfinished_exits_at_once(world):
    # A training loop that stops at max_steps mid-epoch, or a notebook, leaves the loader's
    # reader threads running; at exit they must be stopped before interpreter shutdown freezes
    # them (frozen holding a lock, they hung the exit forever).
    import subprocess
    import sys
    import time

    code = (
        "from edge_glass.features.loader import FeatureLoader\n"
        "from edge_glass.features.store import open_store\n"
        f"loader = FeatureLoader(open_store({str(world.store)!r}, 'train'), 4, block_size=4, reader_threads=3,"
        " reuse_buffers=True, prefetch_batches=4)\n"
        "it = iter(loader)\n"
        "next(it); next(it)\n"
        "print('left it unfinished')\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "left it unfinished" in proc.stdout, proc.stderr
    assert time.monotonic() - start < 60


def test_host_buffers_hold_their_bytes_and_outlive_their_mapping():
    """Huge-page host buffers (batch_buffers.host_buffer): every byte writable and kept, views
    valid after the allocating call's locals are gone, small sizes from torch's allocator."""
    import gc

    from edge_glass.features.batch_buffers import BatchBuffers, host_buffer

    numel = (5 << 20) // 2 + 3  # not a whole number of huge pages
    t = host_buffer(numel, torch.float16)
    assert t.shape == (numel,) and t.dtype == torch.float16
    t.copy_(torch.arange(numel, dtype=torch.float32).remainder(2048).to(torch.float16))
    view = t[-10:].clone()
    del t
    gc.collect()
    buffers = BatchBuffers()
    arr, tensor = buffers.get("x", (64, 576, 64), np.float16)  # 4.7 MB: a huge-page buffer
    arr[:] = 1.5
    small, _ = buffers.get("y", (3, 4), np.int64)  # below one huge page: torch.empty
    small[:] = 7
    gc.collect()
    assert bool((tensor == 1.5).all()) and int(small.sum()) == 84
    assert view.tolist() == [float(i % 2048) for i in range(numel - 10, numel)]
