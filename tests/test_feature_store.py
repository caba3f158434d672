"""Reading the feature store (edge_glass.features.store / hdf5_shard / wds_shard / verify): both
backends hold the same values, token sequences are stored at their true lengths with no padding,
the manifest's statistics are those of the stored rows, and missing or corrupt stores fail with
errors that name the file; `python -m edge_glass.features verify` checks every shard.

Run with:
    python -m pytest tests/test_feature_store.py -q
"""

from __future__ import annotations

import json

import io
import shutil
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.feature_world import extract, feature_world, run
from transformers import AutoTokenizer

from edge_glass.features.store import open_store
from edge_glass.features.verify import verify_store
from edge_glass.utils.errors import UserError

SPLITS = ("train", "val", "test")
MODALITIES = ("audio", "text", "vision")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


@pytest.fixture
def store_copy(world, tmp_path) -> Path:
    """A private copy of the reference store, for tests that damage it."""
    return Path(shutil.copytree(world.store, tmp_path / "store"))


def _all(split):
    return split.read(0, len(split))


# --- the two backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPLITS)
def test_webdataset_and_hdf5_hold_identical_samples(world, name):
    h5 = open_store(world.store, name, backend="hdf5")
    tar = open_store(world.store, name, backend="webdataset")
    assert len(h5) == len(tar) == h5.manifest["num_samples"] > 0
    # Iteration: HDF5 through block reads, WebDataset through the webdataset library.
    n = 0
    for a, b in zip(h5, tar, strict=True):
        assert a.keys() == b.keys()
        assert (a["key"], a["caption"], a["meta"]) == (b["key"], b["caption"], b["meta"])
        for m in MODALITIES:
            for field in (f"{m}_tokens", f"{m}_pooled"):
                assert a[field].dtype == b[field].dtype == np.float16
                assert np.array_equal(a[field], b[field]), (a["key"], field)
        n += 1
    assert n == len(h5)
    # Random access (the loader's path) agrees too, across shard boundaries.
    n = len(h5)
    spans = [(0, n), (n - 1, n), (3, 9)] + ([(20, 30), (47, 73)] if n > 73 else [])  # train: across shards
    for start, stop in spans:
        ba, bb = h5.read(start, stop), tar.read(start, stop)
        assert ba.keys == bb.keys and ba.captions == bb.captions and ba.meta == bb.meta
        assert len(ba) == stop - start
        for m in MODALITIES:
            x, y = ba.modalities[m], bb.modalities[m]
            assert np.array_equal(x.offsets, y.offsets)
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.pooled, y.pooled)
    i = len(h5) - 2
    a, b = h5[i], tar[i]
    assert a["key"] == b["key"] == f"{name}-{i:08d}"
    assert all(np.array_equal(a[f], b[f]) for f in a if f.endswith(("_tokens", "_pooled")))


def test_store_keys_and_captions_follow_the_raw_data(world):
    from edge_glass.data.raw_shards import iter_raw_samples

    for name in SPLITS:
        raw = [(s["key"], s["caption"], s["json"]) for s in iter_raw_samples(world.raw / name)]
        stored = [(s["key"], s["caption"], s["meta"]) for s in open_store(world.store, name)]
        assert stored == raw


# --- true lengths -------------------------------------------------------------------------------


def _npy(tar: tarfile.TarFile, member: tarfile.TarInfo) -> np.ndarray:
    return np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)


def _check_flat_layout(split) -> dict[str, np.ndarray]:
    """No padding is stored: each modality's flat rows are exactly the sum of its lengths."""
    lengths = {}
    for shard in json.loads((split.path / "manifest.json").read_text())["shards"]:
        with h5py.File(split.path / shard["files"]["hdf5"]["file"], "r") as f:
            for m in MODALITIES:
                offsets = f[m]["offsets"][:]
                assert offsets[0] == 0 and len(offsets) == shard["num_samples"] + 1
                assert f[m]["tokens"].shape[0] == offsets[-1]
                lengths.setdefault(m, []).append(np.diff(offsets))
        with tarfile.open(split.path / shard["files"]["webdataset"]["file"]) as t:
            for m in MODALITIES:
                rows = [_npy(t, x).shape[0] for x in t.getmembers() if x.name.endswith(f".{m}_tokens.npy")]
                assert np.array_equal(rows, lengths[m][-1])
    return {m: np.concatenate(v) for m, v in lengths.items()}


def test_token_lengths_are_true_lengths(world):
    split = open_store(world.store, "train")
    lengths = _check_flat_layout(split)
    n = len(split)
    # CLIP: (32 / 8)^2 patches, CLS dropped by default.
    assert np.array_equal(lengths["vision"], np.full(n, 16))
    # Whisper: 1 s clips are 100 mel frames, halved (rounding up) by the stride-2 conv.
    assert np.array_equal(lengths["audio"], np.full(n, -(-100 // 2)))
    # Text: the tokenizer's own count (attention mask) at the model's max length, per caption.
    max_len = split.manifest["encoders"]["text"]["preprocessing"]["max_seq_length"]
    tok = AutoTokenizer.from_pretrained(world.models / "sbert-tiny-random")
    captions = [s["caption"] for s in split]
    want = [sum(m) for m in tok(captions, truncation=True, max_length=max_len)["attention_mask"]]
    assert np.array_equal(lengths["text"], want)
    assert len(set(want)) > 1  # the captions really have different lengths, so padding would show
    assert split.manifest["fields"]["text.tokens"]["max_length"] == max(want)
    # No stored row is a padding row (the random model never outputs an exact zero vector).
    block = _all(split)
    for m in MODALITIES:
        assert (np.abs(block.modalities[m].tokens).sum(1) > 0).all(), m


def test_keep_cls_and_text_max_length_change_lengths(world, tmp_path):
    store = tmp_path / "store"
    extract(world.config(store, ["encoders.vision.keep_cls=true", "encoders.text.max_length=6"]), splits=["val"])
    split = open_store(store, "val")
    lengths = _check_flat_layout(split)
    assert np.array_equal(lengths["vision"], np.full(len(split), 17))
    # All captions are longer than 6 word pieces, so every one is cut to 6 (with [CLS] and [SEP]).
    assert np.array_equal(lengths["text"], np.full(len(split), 6))
    # Patch tokens after the CLS are the default store's tokens (same layer, same model).
    ref = _all(open_store(world.store, "val")).modalities["vision"]
    got = _all(split).modalities["vision"]
    assert np.array_equal(got.tokens.reshape(-1, 17, 64)[:, 1:], ref.tokens.reshape(-1, 16, 64))


# --- statistics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "val"])
def test_manifest_stats_are_the_stored_rows_moments(world, name):
    split = open_store(world.store, name)
    block = _all(split)
    stats = split.manifest["stats"]
    assert set(stats) == {f"{m}.{k}" for m in MODALITIES for k in ("tokens", "pooled")}
    for m in MODALITIES:
        for kind in ("tokens", "pooled"):
            rows = getattr(block.modalities[m], kind).astype(np.float64)
            s = stats[f"{m}.{kind}"]
            assert s["count"] == rows.shape[0]
            np.testing.assert_allclose(s["mean"], rows.mean(0), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(s["std"], rows.std(0), rtol=1e-6, atol=1e-9)
            assert split.field_dim(f"{m}.{kind}") == rows.shape[1]


# --- missing and corrupt stores -----------------------------------------------------------------


def test_missing_store_names_the_path_and_the_extract_command(tmp_path):
    with pytest.raises(UserError) as err:
        open_store(tmp_path / "nope", "train")
    msg = str(err.value)
    assert str(tmp_path / "nope" / "train") in msg and "does not exist" in msg
    assert "scripts/extract_features.py" in msg


def test_truncated_hdf5_shard_is_named_on_read_and_by_verify(store_copy):
    h5 = store_copy / "train" / "shard-000001.h5"
    size = h5.stat().st_size
    with open(h5, "r+b") as f:
        f.truncate(size // 2)
    split = open_store(store_copy, "train", backend="hdf5")
    with pytest.raises(UserError, match=str(h5)):
        split.read(20, 30)
    with pytest.raises(UserError, match=str(h5)):
        list(split)
    problems = verify_store(store_copy)
    assert problems == [f"{h5}: {size // 2} bytes, manifest says {size}"]


def _member(tar: Path, suffix: str, nth: int) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return [m for m in t.getmembers() if m.name.endswith(suffix)][nth]


def _first_member_of(tar: Path, key: str) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return next(m for m in t.getmembers() if m.name.startswith(key + "."))


def test_corrupt_webdataset_array_is_named_on_read_and_by_verify(store_copy):
    tar = store_copy / "train" / "shard-000000.tar"
    member = _member(tar, ".vision_tokens.npy", 3)
    with open(tar, "r+b") as f:  # overwrite the .npy magic: same size, unparseable array
        f.seek(member.offset_data)
        f.write(b"XXXXXX")
    split = open_store(store_copy, "train", backend="webdataset")
    with pytest.raises(UserError, match=str(tar)):
        split.read(0, 24)
    assert split.read(24, 48).keys[0] == "train-00000024"  # other shards still read
    problems = verify_store(store_copy)
    assert len(problems) == 1 and problems[0].startswith(f"{tar}: sha256 differs")


def test_iterating_a_corrupt_webdataset_shard_raises_user_error_naming_it(store_copy):
    tar = store_copy / "train" / "shard-000000.tar"
    member = _member(tar, ".vision_tokens.npy", 3)
    with open(tar, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"XXXXXX")
    with pytest.raises(UserError, match=str(tar)):
        list(open_store(store_copy, "train", backend="webdataset"))


def test_truncated_webdataset_shard_never_reads_short(store_copy):
    tar = store_copy / "train" / "shard-000000.tar"
    # Cut the tar exactly at a member header: tarfile then sees a clean end of archive, 19 of
    # the 24 samples the manifest lists.
    cut = _first_member_of(tar, "train-00000019").offset
    with open(tar, "r+b") as f:
        f.truncate(cut)
    with tarfile.open(tar) as t:  # the premise: a clean, shorter archive
        assert len({m.name.split(".")[0] for m in t.getmembers()}) == 19
    assert any(str(tar) in p for p in verify_store(store_copy))
    split = open_store(store_copy, "train", backend="webdataset")
    with pytest.raises(UserError, match=str(tar)):
        block = split.read(0, 24)
        pytest.fail(f"read(0, 24) returned {len(block)} samples without an error")


def test_truncated_webdataset_shard_is_named_when_iterating(store_copy):
    tar = store_copy / "train" / "shard-000000.tar"
    with open(tar, "r+b") as f:  # mid-member: tarfile itself fails
        f.truncate(_first_member_of(tar, "train-00000019").offset + 700)
    split = open_store(store_copy, "train", backend="webdataset")
    with pytest.raises(UserError, match=str(tar)):
        split.read(0, 24)
    with pytest.raises(UserError, match=str(tar)):
        list(split)


# --- verify -------------------------------------------------------------------------------------


def test_verify_store_finds_nothing_wrong_in_an_intact_store(world):
    assert verify_store(world.store) == []


def test_verify_names_a_missing_shard_and_a_non_store(store_copy, tmp_path):
    gone = store_copy / "val" / "shard-000000.tar"
    gone.unlink()
    assert verify_store(store_copy) == [f"{gone}: missing"]
    (tmp_path / "empty").mkdir()
    assert "no split with a manifest.json" in verify_store(tmp_path / "empty")[0]


def _verify_cli(store: Path):
    return run([sys.executable, "-m", "edge_glass.features", "verify", str(store)], timeout=120)


@pytest.mark.slow
def test_verify_cli_passes_an_intact_store(world):
    ok = _verify_cli(world.store)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{world.store}: every shard matches its manifest" and ok.stderr.strip() == ""


@pytest.mark.slow
def test_verify_cli_names_a_corrupt_shard_and_exits_1(store_copy):
    tar = store_copy / "test" / "shard-000000.tar"
    with open(tar, "r+b") as f:
        f.seek(-600, 2)
        f.write(b"\x01" * 10)
    bad = _verify_cli(store_copy)
    assert bad.returncode == 1
    assert f"{tar}: sha256 differs from the manifest" in bad.stderr
    assert "1 problem(s)" in bad.stderr and "Traceback" not in bad.stderr


def test_a_shard_with_fewer_strings_than_samples_is_named_not_read_short(store_copy):
    """A crafted or damaged shard whose `captions` dataset lost entries: h5py's slicing would
    return the shorter list without a word (and batches would pair captions with the wrong
    features); the reader's low-level string read says which shard and what is missing."""
    split = open_store(store_copy, "train", backend="hdf5")
    n = int(split.shard_sizes[0])
    path = store_copy / "train" / "shard-000000.h5"
    with h5py.File(path, "r+") as f:
        kept = f["captions"][: n - 2]
        del f["captions"]
        f.create_dataset("captions", data=kept, dtype=h5py.string_dtype("utf-8"))
    split = open_store(store_copy, "train", backend="hdf5")
    with pytest.raises(UserError, match=r"shard-000000\.h5.*captions.*outside its"):
        split.read_index(0, n, split.modalities, with_meta=False)
    # The samples before the cut still read, with their own captions.
    block = split.read_index(0, n - 2, split.modalities, with_meta=False)
    assert block.captions == [c.decode() for c in kept]
