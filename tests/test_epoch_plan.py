"""One rank's sample order for one epoch (`edge_glass.features.epoch_plan`).

What is tested:
- `split_blocks` against a plain Python reference, on random shard sizes that include shards
  shorter than a block, size-1 and empty shards: blocks never cross a shard boundary and cover
  every sample once, in store order.
- `EpochPlan` over several (world_size, shuffle, drop_last, window_blocks, batch_size) cases,
  with every rank's plan built: equal batch counts with drop_last; no sample on two ranks or in
  two batches, and every sample exactly once without drop_last; the order is a pure function of
  (seed, epoch); `batch(k)` is the k-th slice of the windows' orders; and the order equals the
  explicit reference below (the previous implementation, which the plan must reproduce exactly
  so that earlier runs' data order is unchanged).
- Window bookkeeping (`batch_windows`, `last_batch_of_window`), the window-order cache under
  out-of-order access, and concurrent `batch` calls.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_glass.features.epoch_plan import EpochPlan, split_blocks

# --- references --------------------------------------------------------------------------------


def reference_blocks(shard_sizes, block_size: int) -> list[tuple[int, int]]:
    """(start, stop) of every block, shard by shard: plain Python."""
    blocks, start = [], 0
    for n in shard_sizes:
        for a in range(0, int(n), block_size):
            blocks.append((start + a, start + min(a + block_size, int(n))))
        start += int(n)
    return blocks


def reference_order(shard_sizes, block_size: int, window_blocks: int, *, seed: int, epoch: int, rank: int,
                    world_size: int, shuffle: bool) -> np.ndarray:
    """This rank's global sample indices for the epoch, in the order the previous
    implementation consumed them."""
    blocks = np.array(reference_blocks(shard_sizes, block_size), dtype=np.int64).reshape(-1, 2)
    n_blocks = len(blocks)
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks) if shuffle else np.arange(n_blocks)
    mine = blocks[order[rank::world_size]]
    sizes = mine[:, 1] - mine[:, 0]
    samples = []
    for w, lo in enumerate(range(0, len(mine), window_blocks)):
        ids = np.arange(lo, min(lo + window_blocks, len(mine)))
        blk = np.repeat(ids, sizes[ids])
        row = np.concatenate([np.arange(n) for n in sizes[ids]])
        if shuffle:
            perm = np.random.default_rng([seed, epoch, rank, w]).permutation(len(blk))
            blk, row = blk[perm], row[perm]
        samples.append(mine[blk, 0] + row)
    return np.concatenate(samples) if samples else np.zeros(0, np.int64)


def random_shard_sizes(rng: np.random.Generator, shards: int, block_size: int) -> np.ndarray:
    """Shard sizes mixing size-1 shards, shards shorter than a block, exact multiples of a
    block and long shards."""
    kinds = [
        lambda: 1,
        lambda: int(rng.integers(2, block_size)) if block_size > 2 else 1,
        lambda: block_size * int(rng.integers(1, 4)),
        lambda: int(rng.integers(block_size + 1, 6 * block_size)),
    ]
    return np.array([kinds[int(rng.integers(len(kinds)))]() for _ in range(shards)], dtype=np.int64)


def plan_samples(plan: EpochPlan, k: int) -> np.ndarray:
    """Global sample indices of batch k."""
    which, rows = plan.batch(k)
    return plan.blocks[which, 0] + rows


def consumed(plan: EpochPlan) -> np.ndarray:
    """Every batch's samples, in order."""
    parts = [plan_samples(plan, k) for k in range(plan.num_batches)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# --- split_blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_blocks_equals_the_plain_python_reference(block_size, seed):
    sizes = random_shard_sizes(np.random.default_rng(seed), 30, block_size)
    assert (sizes == 1).any() or block_size == 1
    blocks = split_blocks(sizes, block_size)
    assert blocks.dtype == np.int64 and blocks.shape[1] == 2
    assert blocks.tolist() == [list(b) for b in reference_blocks(sizes, block_size)]


def test_split_blocks_never_crosses_a_shard_and_covers_every_sample_once_in_order():
    sizes = np.array([1, 5, 16, 17, 1, 1, 40, 3, 32, 2])
    blocks = split_blocks(sizes, 16)
    starts, stops = blocks[:, 0], blocks[:, 1]
    assert (stops > starts).all() and (stops - starts <= 16).all()
    # Consecutive and complete: each block starts where the previous ended.
    assert starts[0] == 0 and stops[-1] == sizes.sum()
    assert (starts[1:] == stops[:-1]).all()
    # No block crosses a shard boundary: start and stop-1 fall in the same shard.
    bounds = np.cumsum(sizes)
    shard_of_first = np.searchsorted(bounds, starts, side="right")
    shard_of_last = np.searchsorted(bounds, stops - 1, side="right")
    assert (shard_of_first == shard_of_last).all()
    # Blocks per shard: ceil(size / 16).
    assert np.bincount(shard_of_first, minlength=len(sizes)).tolist() == [-(-int(n) // 16) for n in sizes]


def test_split_blocks_skips_empty_shards():
    sizes = np.array([4, 0, 3, 0, 0, 5])
    assert split_blocks(sizes, 2).tolist() == [list(b) for b in reference_blocks(sizes, 2)]


# --- EpochPlan against the reference ------------------------------------------------------------

BLOCK = 8
SHARD_SIZES = random_shard_sizes(np.random.default_rng(123), 40, BLOCK)
TOTAL = int(SHARD_SIZES.sum())
N_BLOCKS = len(reference_blocks(SHARD_SIZES, BLOCK))

# (world_size, shuffle, drop_last, window_blocks, batch_size)
CASES = [
    (1, True, False, 4, 16),
    (1, False, False, 4, 16),
    (2, True, True, 4, 16),
    (2, True, False, 3, 10),
    (3, True, True, 1, 7),
    (3, False, True, 5, 12),
    (4, True, False, 2, 40),  # a batch spans several windows
    (4, False, False, 1000, 5),  # one window holds all of a rank's blocks
    (5, True, True, 6, 1),
]


def build_plans(world_size, shuffle, drop_last, window_blocks, batch_size, *, seed=7, epoch=3, sizes=SHARD_SIZES):
    return [
        EpochPlan(sizes, BLOCK, window_blocks, batch_size, seed=seed, epoch=epoch, rank=rank,
                  world_size=world_size, shuffle=shuffle, drop_last=drop_last)
        for rank in range(world_size)
    ]


def case_id(case) -> str:
    world, shuffle, drop_last, window_blocks, batch_size = case
    return f"w{world}-{'shuf' if shuffle else 'seq'}-{'drop' if drop_last else 'keep'}-win{window_blocks}-b{batch_size}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_order_equals_the_previous_implementations(case):
    world, shuffle, drop_last, window_blocks, batch_size = case
    for plan in build_plans(*case):
        want = reference_order(SHARD_SIZES, BLOCK, window_blocks, seed=7, epoch=3, rank=plan.rank,
                               world_size=world, shuffle=shuffle)
        got = consumed(plan)
        assert plan.num_samples == len(want)
        if drop_last:
            assert len(got) == plan.num_batches * batch_size
            assert np.array_equal(got, want[: len(got)])
        else:
            assert np.array_equal(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if c[2]], ids=case_id)
def test_with_drop_last_every_rank_runs_the_same_number_of_full_batches(case):
    plans = build_plans(*case)
    batch_size = case[4]
    counts = {plan.num_batches for plan in plans}
    assert len(counts) == 1
    assert counts.pop() == min(plan.num_samples for plan in plans) // batch_size
    for plan in plans:
        assert all(len(plan_samples(plan, k)) == batch_size for k in range(plan.num_batches))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_sample_is_read_twice_and_without_drop_last_every_sample_is_read(case):
    plans = build_plans(*case)
    everything = np.concatenate([consumed(plan) for plan in plans])
    assert len(np.unique(everything)) == len(everything)
    assert ((everything >= 0) & (everything < TOTAL)).all()
    if not case[2]:
        assert np.array_equal(np.sort(everything), np.arange(TOTAL))
        for plan in plans:
            assert plan.num_batches == -(-plan.num_samples // case[4])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_batch_k_is_the_kth_slice_of_the_windows_orders(case):
    batch_size = case[4]
    for plan in build_plans(*case):
        blocks = np.concatenate([plan.window_order(w)[0] for w in range(plan.num_windows)])
        rows = np.concatenate([plan.window_order(w)[1] for w in range(plan.num_windows)])
        assert len(blocks) == plan.num_samples == plan.window_starts[-1]
        for k in range(plan.num_batches):
            which, row = plan.batch(k)
            assert np.array_equal(which, blocks[k * batch_size:(k + 1) * batch_size])
            assert np.array_equal(row, rows[k * batch_size:(k + 1) * batch_size])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_window_bookkeeping_agrees_with_the_window_starts(case):
    batch_size = case[4]
    for plan in build_plans(*case):
        starts = plan.window_starts
        # A window's blocks are window_blocks consecutive blocks; their samples fill the window.
        for w in range(plan.num_windows):
            ids = plan.window_blocks_of(w)
            assert len(ids) == min(plan.window_blocks, len(plan.blocks) - ids.start)
            sizes = plan.blocks[list(ids), 1] - plan.blocks[list(ids), 0]
            assert sizes.sum() == starts[w + 1] - starts[w]
            assert plan.last_batch_of_window(w) == (starts[w + 1] - 1) // batch_size
        # batch_windows(k): exactly the windows holding positions of batch k.
        for k in range(plan.num_batches):
            positions = np.arange(k * batch_size, min((k + 1) * batch_size, starts[-1]))
            holding = np.unique(np.searchsorted(starts, positions, side="right") - 1)
            assert list(plan.batch_windows(k)) == holding.tolist()


# --- purity ---------------------------------------------------------------------------------------


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    case = (2, True, False, 3, 10)
    first = [consumed(p) for p in build_plans(*case, seed=11, epoch=4)]
    again = [consumed(p) for p in build_plans(*case, seed=11, epoch=4)]
    next_epoch = [consumed(p) for p in build_plans(*case, seed=11, epoch=5)]
    other_seed = [consumed(p) for p in build_plans(*case, seed=12, epoch=4)]
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, next_epoch))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))
    # Another epoch is another permutation of the same samples.
    assert np.array_equal(np.sort(np.concatenate(first)), np.sort(np.concatenate(next_epoch)))


def test_without_shuffle_the_order_ignores_seed_and_epoch():
    case = (3, False, False, 2, 9)
    a = [consumed(p) for p in build_plans(*case, seed=1, epoch=0)]
    b = [consumed(p) for p in build_plans(*case, seed=2, epoch=9)]
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    # Rank r reads blocks r, r + world, ... in store order.
    blocks = split_blocks(SHARD_SIZES, BLOCK)
    for rank, plan in enumerate(build_plans(*case)):
        assert np.array_equal(plan.blocks, blocks[rank::3])


def test_shuffling_mixes_samples_within_a_window():
    (plan,) = build_plans(1, True, False, 8, 16)
    order = consumed(plan)
    # Consecutive samples of a shuffled window rarely come from the same block.
    which = np.concatenate([plan.window_order(w)[0] for w in range(plan.num_windows)])
    assert np.mean(which[1:] == which[:-1]) < 0.5
    assert not np.array_equal(order, np.sort(order))


# --- cache and threads ----------------------------------------------------------------------------


def test_out_of_order_batches_match_in_order_batches_past_the_window_cache():
    """More than 16 windows (the plan caches 16 windows' orders): asking for batches backwards
    and at random gives what a fresh plan gives in order."""
    case = (1, True, False, 1, 5)
    (forward,) = build_plans(*case)
    (backward,) = build_plans(*case)
    assert forward.num_windows > 40
    want = [plan_samples(forward, k) for k in range(forward.num_batches)]
    for k in reversed(range(backward.num_batches)):
        assert np.array_equal(plan_samples(backward, k), want[k])
    for k in np.random.default_rng(0).permutation(backward.num_batches):
        assert np.array_equal(plan_samples(backward, int(k)), want[int(k)])


def test_concurrent_batch_calls_give_the_sequential_result():
    case = (2, True, False, 1, 6)
    (reference, _) = build_plans(*case)
    want = [plan_samples(reference, k) for k in range(reference.num_batches)]
    (shared, _) = build_plans(*case)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(t: int):
        try:
            ks = np.random.default_rng(t).permutation(shared.num_batches)
            results[t] = [(int(k), plan_samples(shared, int(k))) for k in ks]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(results) == 6
    for pairs in results.values():
        for k, samples in pairs:
            assert np.array_equal(samples, want[k])


def test_more_ranks_than_blocks_gives_empty_ranks_no_batches():
    sizes = np.array([3, 2])  # two blocks of 8 at most
    plans = build_plans(4, True, True, 2, 2, sizes=sizes)
    assert {p.num_batches for p in plans} == {0}
    plans = build_plans(4, True, False, 2, 2, sizes=sizes)
    assert sorted(p.num_samples for p in plans) == [0, 0, 2, 3]
    everything = np.concatenate([consumed(p) for p in plans])
    assert np.array_equal(np.sort(everything), np.arange(5))
