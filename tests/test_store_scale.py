"""The data path at the size stores have: many shards, a low open-file limit, several epochs.

    python -m pytest tests/test_store_scale.py -q

- A 1,000-shard store trains on 2 ranks under `ulimit -n 256` (the loader keeps at most
  data.max_open_shards files open per split) and a run resumed from its step-6 checkpoint, with
  another number of reader threads, equals the uninterrupted run bit for bit.
  Each rank reads more shards than the limit allows open, so only a bounded cache passes.
- Open files and resident memory after 1 and after 3 epochs over 1,000 shards (a 65 MB store)
  stay within a fixed bound of where they were before the first batch (half the store),
  and shards are really closed and reopened (the cache cycles).
- With release_pages, an epoch's token rows leave the page cache; without, they stay.
- A file limit too low for data.max_open_shards is one line naming the limit and the fix; a
  shard that cannot be opened later says why (missing, truncated, file limit, permission) and
  which file.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers.feature_world import World, feature_world
from helpers.random_store import TINY_SHAPES, random_store
from helpers.trainer_world import (
    Result,
    assert_one_line_error,
    assert_same_training,
    assert_same_weights,
    checkpoint,
    complete_steps,
    env,
)

from edge_glass.config import config_from_dict
from edge_glass.features.epoch_plan import EpochPlan
from edge_glass.features.hdf5_shard import header_files
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import open_store
from edge_glass.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHARDS, SHARD_SIZE = 1000, 8
STEPS = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return feature_world(tmp_path_factory)


def _config_dict(world: World, store: Path, **data) -> dict:
    d = world.config_dict(store, [
        "experiment.name=scale",
        "data.micro_batch_size=16",
        "data.eval_batch_size=16",
        "data.read_block_size=4",
        f"train.max_steps={STEPS}",
        "train.log_interval=1",
        "train.eval_interval=6",
        "train.save_interval=6",
        "train.keep_last=10",
        "train.precision=fp32",
        f"train.deepspeed={REPO / 'ds_configs' / 'zero2.json'}",
        "model.shared_dim=16",
        "model.adapters.vision={kind: attn_pool, hidden_dim: 16, num_heads: 2}",
        "model.adapters.audio={kind: mlp, hidden_dim: 16}",
        "model.adapters.text={kind: mlp, hidden_dim: 16}",
        "loss.pairs={vision_text: 1.0, audio_text: 1.0}",
    ])
    d["data"].update(data)
    return d


# Vision rows wider than the tiny default: 8 KB a sample, 65 MB over the train split, so a loader
# that kept what it read (a map, a block's rows, a window never dropped) would show in its memory.
SHAPES = {**TINY_SHAPES, "vision": (32, 128, 16)}


@pytest.fixture(scope="module")
def big_store(world: World, tmp_path_factory) -> Path:
    """1,000 train shards of 8 samples (and a small val split), random features."""
    root = tmp_path_factory.mktemp("thousand-shards") / "store"
    return random_store(root, config_from_dict(_config_dict(world, root)), {"train": (SHARDS, SHARD_SIZE), "val": (4, 8)},
                        shapes=SHAPES)


def _shards_read(cfg, rank: int, world_size: int, steps: int) -> int:
    """Distinct shards rank `rank` reads in its first `steps` batches: every block of every
    window those batches draw from (the loader reads a window's blocks together)."""
    plan = EpochPlan(np.full(SHARDS, SHARD_SIZE), cfg.data.read_block_size, cfg.data.shuffle_window_blocks,
                     cfg.data.micro_batch_size, seed=cfg.experiment.seed, epoch=0, rank=rank, world_size=world_size,
                     shuffle=True, drop_last=True)
    blocks = {b for k in range(steps) for w in plan.batch_windows(k) for b in plan.window_blocks_of(w)}
    return len({int(plan.blocks[b, 0]) // SHARD_SIZE for b in blocks})


def _train(place: Path, config: Path, file_limit: int, *args: str, nproc: int = 2) -> Result:
    launcher = (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {nproc}" if nproc > 1
                else sys.executable)
    cmd = f"ulimit -n {file_limit} && exec {launcher} {REPO / 'scripts' / 'train.py'} --config {config} " + " ".join(args)
    proc = subprocess.run(["bash", "-c", cmd], cwd=place, env=env(), capture_output=True, text=True, timeout=600)
    return Result(["bash", "-c", cmd], proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_a_thousand_shard_store_trains_and_resumes_exactly_under_ulimit_256(world, big_store, tmp_path):
    # A sample a block and 32 a batch: each rank reads ~320 shards in 12 steps, more than the
    # limit allows open at once, so a loader that left the files it read open fails here.
    d = _config_dict(world, big_store, reader_threads=2, max_open_shards=32, micro_batch_size=32, read_block_size=1)
    assert min(_shards_read(config_from_dict(d), r, 2, STEPS) for r in range(2)) > 256
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(d))
    reference = tmp_path / "reference"
    reference.mkdir()
    _train(reference, config, 256).check()
    run = reference / "runs" / "scale"
    assert complete_steps(run) == [6, 12]

    # The same run killed after its step-6 checkpoint: only that checkpoint on disk. It resumes
    # with 3 reader threads instead of 2 (batches do not depend on the thread count).
    resumed = tmp_path / "resumed"
    shutil.copytree(reference / "runs", resumed / "runs")
    shutil.rmtree(checkpoint(resumed / "runs" / "scale", 12))
    result = _train(resumed, config, 256, "--set", "data.reader_threads=3").check()
    assert "resumed from" in result.stdout and "at step 6" in result.stdout
    assert_same_training(resumed / "runs" / "scale", run, range(7, STEPS + 1))
    assert_same_weights(checkpoint(resumed / "runs" / "scale", 12), checkpoint(run, 12))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    """Resident bytes, anonymous and file-backed (a memory map of the store counts here)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))


def test_open_files_and_memory_stay_flat_over_epochs(big_store):
    """Against the state before the first batch, not only epoch 1 against epoch 3: a loader that
    kept every sample it read would be at its peak after one epoch, and flat from then on."""
    split = open_store(big_store, "train", max_open_shards=16)
    store_bytes = sum(p.stat().st_size for p in (big_store / "train").glob("*.h5"))
    loader = FeatureLoader(split, 64, block_size=8, reader_threads=2, reuse_buffers=True)
    before_fds, before_rss = _open_fds(), _rss()

    def epoch() -> int:
        return sum(len(b["keys"]) for b in loader)

    assert epoch() == len(loader) * 64
    fds_1, rss_1 = _open_fds(), _rss()
    for _ in range(2):
        epoch()
    fds_3, rss_3 = _open_fds(), _rss()
    assert len(split.cache) <= 16
    assert split.cache.opens > 3 * 16, "shards were never closed and reopened: the cache did not cycle"
    assert fds_1 <= before_fds + 16 and fds_3 <= before_fds + 16, (before_fds, fds_1, fds_3)
    # Half the store (39 MB): a loader that kept what it read, mapped or in memory, holds all of
    # it by the end of epoch 1. What the first epoch adds whatever the store's size is ~15-20 MB
    # on the project's CPU box (the ring of batch buffers, the reader threads' malloc arenas, h5py).
    bound = store_bytes // 2
    for when, rss in (("1 epoch", rss_1), ("3 epochs", rss_3)):
        assert rss - before_rss < bound, (f"resident memory grew by {(rss - before_rss) / 2**20:.1f} MB after {when} "
                                          f"over a {store_bytes / 2**20:.0f} MB store")


def test_only_a_few_shards_are_opened_through_hdf5(big_store):
    """HDF5 keeps ~0.6 MB of state for every file it has open; the loader reads token rows,
    offsets and pooled vectors from plain descriptors and opens through HDF5 only the few shards
    whose strings it is reading. Counted by HDF5 itself, at every batch, in the reader threads."""
    import h5py

    def open_in_hdf5() -> int:
        return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)

    gc.collect()
    before = open_in_hdf5()  # another test's split may not be collected yet
    split = open_store(big_store, "train", max_open_shards=32)
    limit = header_files(32)
    seen: list[int] = []

    def count(batch: dict) -> dict:
        seen.append(open_in_hdf5() - before)
        return batch

    loader = FeatureLoader(split, 64, block_size=8, reader_threads=2, reuse_buffers=True, transform=count)
    assert sum(len(b["keys"]) for b in loader) == len(loader) * 64
    assert split.cache.opens > 32, "the descriptors never cycled: the store is too small to test this"
    # A cache may briefly hold one more per reader thread while all of its entries are in use.
    assert max(seen) <= limit + 2, (max(seen), limit)
    assert len(split.headers) <= limit and len(split.cache) <= 32 - limit
    split.close()
    assert open_in_hdf5() <= before


def _resident_fraction(path: Path) -> float:
    """Share of `path`'s pages in the page cache (mincore on a read-only map, which faults nothing in)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this OS")
@pytest.mark.parametrize("release", [False, True])
def test_release_pages_drops_what_an_epoch_consumed_from_the_page_cache(world, tmp_path, release):
    """With release_pages, a shard's token rows leave the page cache once their batches are
    consumed (what a split larger than memory needs); without, they stay for the next epoch.
    Token rows are most of each file here (vision, 8 KB a sample); the strings, offsets and
    pooled vectors a block's index reads stay either way."""
    store = random_store(tmp_path / "store", config_from_dict(_config_dict(world, tmp_path / "store")),
                         {"train": (40, 8)}, shapes=SHAPES)
    files = sorted((store / "train").glob("*.h5"))
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())  # written back: the kernel keeps dirty pages whatever it is advised
            fh.read()  # cached, as a store read an epoch before
    if min(_resident_fraction(f) for f in files) < 0.99:
        pytest.skip("this filesystem does not keep what was just read in the page cache")
    # A block is a whole shard: no later read of a neighbouring block in the same file, whose
    # readahead would bring a released block's pages back (at the shapes where releasing
    # matters, a block is tens of MB and the kernel's readahead a few hundred KB).
    loader = FeatureLoader(open_store(store, "train"), 16, block_size=8, reader_threads=2, reuse_buffers=True,
                           release_pages=release)
    assert sum(len(b["keys"]) for b in loader) == 320
    resident = sum(_resident_fraction(f) for f in files) / len(files)
    if release:
        assert resident < 0.5, f"{resident:.0%} of the store still cached after an epoch with release_pages"
    else:
        assert resident > 0.95, f"only {resident:.0%} of the store cached after an epoch without release_pages"


def test_a_file_limit_below_what_max_open_shards_needs_is_one_line(world, big_store, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config_dict(world, big_store, max_open_shards=400)))
    result = _train(tmp_path, config, 256, nproc=1)
    line = assert_one_line_error(result, "data.max_open_shards=400", "ulimit -n", "256")
    assert "corrupt" not in line


def _loader_script(store: Path, body: str) -> list[str]:
    """`python -c` running `body` (with `store` defined); a UserError becomes `error: ...`, exit 2."""
    lines = [
        "import os, resource, sys",
        "from edge_glass.features.loader import FeatureLoader",
        "from edge_glass.features.store import open_store",
        "from edge_glass.utils.errors import UserError",
        f"store = {str(store)!r}",
        "try:",
        textwrap.indent(textwrap.dedent(body).strip(), "    "),
        "except UserError as e:",
        "    print('error:', e)",
        "    sys.exit(2)",
    ]
    return [sys.executable, "-c", "\n".join(lines)]


def test_running_out_of_descriptors_mid_epoch_names_the_shard_and_the_limit(big_store):
    # The process uses up its descriptors after the loader's check (another library, a leak):
    # the next shard open fails with EMFILE, which must not read as a corrupt shard.
    body = """
        resource.setrlimit(resource.RLIMIT_NOFILE, (220, 220))
        loader = FeatureLoader(open_store(store, "train", max_open_shards=32), 32, block_size=4, reader_threads=1)
        hog = []
        try:
            while True:
                hog.append(open(os.devnull))
        except OSError:
            pass
        for batch in loader:
            pass
    """
    proc = subprocess.run(_loader_script(big_store, body), capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 2, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert "too many open files" in line and "ulimit -n" in line and ".h5" in line, line
    assert "corrupt" not in line


def test_a_missing_shard_is_named_as_missing(world, tmp_path):
    store = random_store(tmp_path / "store", config_from_dict(_config_dict(world, tmp_path / "store")),
                         {"train": (6, 8)})
    victim = store / "train" / "shard-000003.h5"
    victim.unlink()
    body = """
        for batch in FeatureLoader(open_store(store, "train"), 8, block_size=4, shuffle=False):
            pass
    """
    proc = subprocess.run(_loader_script(store, body), capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert str(victim) in line and "missing" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_shard_is_named_with_permission_denied(world, tmp_path):
    store = random_store(tmp_path / "store", config_from_dict(_config_dict(world, tmp_path / "store")),
                         {"train": (2, 8)})
    victim = store / "train" / "shard-000001.h5"
    victim.chmod(0)
    body = """
        for batch in FeatureLoader(open_store(store, "train"), 8, block_size=4, shuffle=False):
            pass
    """
    proc = subprocess.run(_loader_script(store, body), capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert str(victim) in line and "permission denied" in line, line


def test_a_shard_truncated_after_the_store_was_opened_is_named_as_truncated(world, tmp_path):
    # The store's own size check passes at open; the file is cut afterwards (a copy still being
    # written, a full disk), so the loader meets it mid-epoch.
    store = random_store(tmp_path / "store", config_from_dict(_config_dict(world, tmp_path / "store")),
                         {"train": (6, 8)})
    victim = store / "train" / "shard-000003.h5"
    body = f"""
        split = open_store(store, "train")
        os.truncate({str(victim)!r}, os.path.getsize({str(victim)!r}) // 2)
        for batch in FeatureLoader(split, 8, block_size=4, shuffle=False):
            pass
    """
    proc = subprocess.run(_loader_script(store, body), capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert str(victim) in line and "truncated" in line, line
    assert "Traceback" not in proc.stderr, proc.stderr


def test_a_shard_replaced_while_its_descriptor_is_open_is_refused_not_mixed(world, tmp_path):
    """Token rows come from a shard's descriptor, strings and layout from a separately opened
    HDF5 handle. A re-extraction renames a new file into place: a handle opened after that would
    describe another file than the descriptor reads, so the loader must refuse, not mix them."""
    store = random_store(tmp_path / "store", config_from_dict(_config_dict(world, tmp_path / "store")),
                         {"train": (6, 8)})
    victim = store / "train" / "shard-000003.h5"
    split = open_store(store, "train")
    shard = split.shards[3]
    before = shard.read(0, 4)  # the descriptor and the HDF5 handle, both of the original file
    split.headers.close()  # the split's few HDF5 handles cycled (a larger store does it all the time)
    replacement = tmp_path / "replacement.h5"
    shutil.copyfile(victim, replacement)
    os.replace(replacement, victim)
    with pytest.raises(UserError, match="replaced while this run was reading it"):
        shard.read(0, 4)
    split.close()  # both reopened now name the same (new) file: it reads again
    after = shard.read(0, 4)
    assert after.keys == before.keys
    np.testing.assert_array_equal(after.modalities["vision"].tokens, before.modalities["vision"].tokens)
