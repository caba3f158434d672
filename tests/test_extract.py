"""Feature extraction (edge_glass.features.extract, scripts/extract_features.py): deterministic to
the byte, resumable after a simulated crash and after a real kill -9, the same on 2 ranks as on
1, refusing a store made with other encoder settings, and clear errors for missing raw data.

Run with:
    python -m pytest tests/test_extract.py -q            # add -m 'not slow' to skip the subprocess ones
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from helpers.feature_world import (
    FORMATS,
    assert_same_store,
    extract,
    extract_cmd,
    feature_world,
    kill_group,
    run,
    shard_digests,
    start,
    subprocess_env,
)

from edge_glass.features.store import open_store
from edge_glass.utils.errors import UserError


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


def _copy_store(world, dest: Path) -> Path:
    shutil.copytree(world.store, dest)
    return dest


# --- determinism --------------------------------------------------------------------------------


def test_two_extractions_are_byte_identical(world, tmp_path):
    other = tmp_path / "store"
    extract(world.config(other))
    assert_same_store(world.store, other)
    # Layout: raw shard i became feature shard i, in both formats, plus one record each.
    train = sorted(p.name for p in (other / "train").iterdir())
    assert train == [".lock", "extraction.json", "manifest.json"] + [
        f"shard-{i:06d}{ext}" for i in range(6) for ext in (".h5", ".json", ".tar")
    ]


# --- resume -------------------------------------------------------------------------------------


def test_resume_after_simulated_crash_redoes_only_incomplete_shards(world, tmp_path):
    store = _copy_store(world, tmp_path / "store")
    train = store / "train"
    # Shard 1: its record and its .h5 are gone (crash after the .tar was renamed into place).
    (train / "shard-000001.json").unlink()
    (train / "shard-000001.h5").unlink()
    # Shard 2: no record, and a half-written temporary beside its (complete-looking) files.
    (train / "shard-000002.json").unlink()
    stale = train / ".tmp-shard-000002.h5.abc"
    stale.write_bytes(b"half a shard")
    kept = {p.name: p.stat().st_mtime_ns for p in train.glob("shard-00000[0345].*")}
    assert len(kept) == 12

    extract(world.config(store))

    assert_same_store(world.store, store)
    assert not stale.exists()
    assert not list(train.glob(".tmp-*"))
    # Complete shards were skipped, not rewritten with the same bytes.
    assert {name: (train / name).stat().st_mtime_ns for name in kept} == kept


@pytest.mark.slow
def test_resume_after_kill_9_matches_uninterrupted_store(world, tmp_path):
    store = tmp_path / "store"
    config = world.write_config(tmp_path / "cfg.yaml", store)
    cmd = extract_cmd(config, "--format", "both")
    proc = start(cmd)
    try:
        deadline = time.monotonic() + 120
        while not list((store / "train").glob("shard-*.json")):
            assert proc.poll() is None, f"extraction ended before the first shard record:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no shard record appeared within 120 s"
            time.sleep(0.02)
    finally:
        kill_group(proc, signal.SIGKILL)
        proc.communicate()
    # The kill really interrupted the split: no manifest, and readers say so.
    assert not (store / "train" / "manifest.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        open_store(store, "train")

    done = run(cmd, timeout=180)
    assert done.returncode == 0, done.stderr
    assert_same_store(world.store, store)
    assert not list(store.rglob(".tmp-*"))


# --- ranks --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_extraction_equals_one_rank(world, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")
    stores = {}
    for ranks in (1, 2):
        store = tmp_path / f"store-{ranks}"
        config = world.write_config(tmp_path / f"cfg-{ranks}.yaml", store)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            *extract_cmd(config, "--format", "both")[1:],
        ]
        done = run(cmd, timeout=240, env=env)
        # The ranks' own errors, not torchrun's summary that buries them.
        assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Error" in line)[-3000:]
        stores[ranks] = store
    assert_same_store(stores[1], stores[2])


# --- refusing another store, formats ------------------------------------------------------------


def test_store_of_other_encoder_settings_is_refused_unless_overwrite(world, tmp_path):
    store = _copy_store(world, tmp_path / "store")
    before = shard_digests(store)
    old_fp = json.loads((store / "val" / "manifest.json").read_text())["fingerprint"]
    cfg = world.config(store, ["encoders.vision.layer=-1"])

    with pytest.raises(UserError) as err:
        extract(cfg, splits=["val"])
    msg = str(err.value)
    new_fp = msg.split("this config ")[1][:16]
    assert old_fp in msg and new_fp != old_fp
    # Exactly the changed setting is named, not every field of the encoder description.
    assert "differs in encoders.vision.layer)" in msg
    assert "--overwrite" in msg and str(store / "val") in msg
    assert shard_digests(store) == before  # nothing was touched

    extract(cfg, overwrite=True, splits=["val"])
    manifest = json.loads((store / "val" / "manifest.json").read_text())
    assert manifest["fingerprint"] == new_fp
    assert manifest["encoders"]["vision"]["layer"] == -1
    # The vision features changed; the audio and text ones (same settings) did not.
    old, new = open_store(world.store, "val"), open_store(store, "val")
    a, b = old.read(0, len(old)), new.read(0, len(new))
    assert a.keys == b.keys
    assert not (a.modalities["vision"].tokens == b.modalities["vision"].tokens).all()
    for m in ("audio", "text"):
        assert (a.modalities[m].tokens == b.modalities[m].tokens).all()


def test_adding_a_format_as_the_error_hint_says_keeps_the_existing_one(world, tmp_path):
    store = tmp_path / "store"
    cfg = world.config(store)
    extract(cfg, formats=["hdf5"], splits=["val"])
    with pytest.raises(UserError, match=r"--format webdataset") as err:
        open_store(store, "val", backend="webdataset")
    assert "add them with" in str(err.value)

    # Follow the hint: the store should then hold both backends, as "add" promises.
    extract(cfg, formats=["webdataset"], splits=["val"])
    manifest = json.loads((store / "val" / "manifest.json").read_text())
    assert manifest["formats"] == FORMATS
    h5, tar = open_store(store, "val", backend="hdf5"), open_store(store, "val", backend="webdataset")
    assert h5.read(0, len(h5)).keys == tar.read(0, len(tar)).keys


# --- missing inputs -----------------------------------------------------------------------------


def test_missing_raw_data_names_the_directory_and_the_download_command(world, tmp_path):
    raw = tmp_path / "no-raw"
    with pytest.raises(UserError) as err:
        extract(world.config(tmp_path / "store", raw_dir=raw))
    msg = str(err.value)
    assert str(raw / "train") in msg and "does not exist" in msg
    assert "scripts/download_datasets.py --dataset synthetic" in msg and f"--out {raw}" in msg


@pytest.mark.slow
def test_script_reports_missing_raw_data_as_one_error_line(world, tmp_path):
    raw = tmp_path / "no-raw"
    config = world.write_config(tmp_path / "cfg.yaml", tmp_path / "store", raw_dir=raw)
    done = run(extract_cmd(config), timeout=120)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(raw / "train") in errors[0] and "download_datasets.py" in errors[0]
    assert "Traceback" not in done.stderr
