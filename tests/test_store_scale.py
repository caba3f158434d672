"""The data path at the size stores have: many shards, a low open-file limit, several epochs.

    python -m pytest tests/test_store_scale.py -q

- A 1,000-shard store trains on 2 ranks under `ulimit -n 256` (the loader keeps at most
  data.max_open_shards files open per split) and a run resumed from its step-6 checkpoint, with
  another number of reader threads, equals the uninterrupted run bit for bit.
- Open files and resident memory after 1 and after 3 epochs over 1,000 shards stay within a
  fixed bound, and shards are really closed and reopened (the cache cycles).
- A file limit too low for data.max_open_shards is one line naming the limit and the fix; a
  shard that cannot be opened later says why (missing, file limit) and which file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from helpers.feature_world import World, feature_world
from helpers.random_store import random_store
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
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import open_store

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


@pytest.fixture(scope="module")
def big_store(world: World, tmp_path_factory) -> Path:
    """1,000 train shards of 8 samples (and a small val split), random features."""
    root = tmp_path_factory.mktemp("thousand-shards") / "store"
    return random_store(root, config_from_dict(_config_dict(world, root)), {"train": (SHARDS, SHARD_SIZE), "val": (4, 8)})


def _train(place: Path, config: Path, file_limit: int, *args: str, nproc: int = 2) -> Result:
    launcher = (f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node {nproc}" if nproc > 1
                else sys.executable)
    cmd = f"ulimit -n {file_limit} && exec {launcher} {REPO / 'scripts' / 'train.py'} --config {config} " + " ".join(args)
    proc = subprocess.run(["bash", "-c", cmd], cwd=place, env=env(), capture_output=True, text=True, timeout=600)
    return Result(["bash", "-c", cmd], proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_a_thousand_shard_store_trains_and_resumes_exactly_under_ulimit_256(world, big_store, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_config_dict(world, big_store, reader_threads=2, max_open_shards=32)))
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
    split = open_store(big_store, "train", max_open_shards=16)
    loader = FeatureLoader(split, 32, block_size=4, reader_threads=2, reuse_buffers=True)
    before = _open_fds()

    def epoch() -> int:
        return sum(len(b["keys"]) for b in loader)

    assert epoch() == len(loader) * 32
    fds_1, rss_1 = _open_fds(), _rss()
    for _ in range(2):
        epoch()
    fds_3, rss_3 = _open_fds(), _rss()
    assert len(split.cache) <= 16
    assert split.cache.opens > 3 * 16, "shards were never closed and reopened: the cache did not cycle"
    assert fds_1 <= before + 16 and fds_3 <= before + 16, (before, fds_1, fds_3)
    assert abs(rss_3 - rss_1) < 24 * 2**20, f"resident memory grew by {(rss_3 - rss_1) / 2**20:.1f} MB over 2 epochs"


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
    line = proc.stdout.strip().splitlines()[-1]
    assert str(victim) in line and "permission denied" in line, line
