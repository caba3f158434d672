"""Raw shards: byte-reproducible, readable by plain webdataset and tarfile, resumable, never mixed."""

from __future__ import annotations

import hashlib
import json
import runpy
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import REPO, run_script

from edge_glass.data.raw_shards import (
    encode_sample,
    iter_raw_samples,
    list_shards,
    prepare_raw_dataset,
    write_shards,
)
from edge_glass.data.registry import get_dataset
from edge_glass.data.synthetic import SyntheticSource, make_sample
from edge_glass.data.synthetic_attributes import Attributes, caption
from edge_glass.utils.errors import UserError

N, SHARD = 60, 16  # train 48 = 3 shards, val 6 and test 6 = 1 shard each


def _write(out: Path, *, workers: int = 1, overwrite: bool = False, shard_size: int = SHARD, **source_kwargs) -> None:
    source_kwargs.setdefault("num_samples", N)
    plan = prepare_raw_dataset(out, SyntheticSource(**source_kwargs), shard_size=shard_size, overwrite=overwrite)
    write_shards(plan, workers=workers)


def _digests(out: Path) -> dict[str, str]:
    """Every file under `out` (relative path -> sha256), hidden leftovers included."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    _write(out)
    return out


# --- layout and reproducibility ---------------------------------------------------------------


def test_layout_index_and_description(clean):
    assert sorted(p.name for p in (clean / "train").iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"
    ]
    index = json.loads((clean / "train" / "index.json").read_text())
    assert index["total"] == 48 and [s["samples"] for s in index["shards"]] == [16, 16, 16]
    assert all(s["bytes"] == (clean / "train" / s["name"]).stat().st_size for s in index["shards"])
    assert json.loads((clean / "val" / "index.json").read_text())["total"] == 6
    desc = json.loads((clean / "dataset.json").read_text())
    assert desc["source"] == "synthetic" and desc["splits"] == {"train": 48, "val": 6, "test": 6}
    assert {"seed": 0, "split_fractions": [0.8, 0.1, 0.1], "image_size": 64, "sample_rate": 16000,
            "holdout": True, "shard_size": SHARD, "audio_format": "flac"}.items() <= desc["params"].items()


def test_same_seed_gives_identical_bytes_and_another_seed_differs(clean, tmp_path):
    _write(tmp_path / "again", workers=2)  # parallel writing must not change a byte either
    assert _digests(tmp_path / "again") == _digests(clean)
    _write(tmp_path / "other", seed=1)
    other = _digests(tmp_path / "other")
    for name in ("train/shard-000000.tar", "val/shard-000000.tar", "test/shard-000000.tar"):
        assert other[name] != _digests(clean)[name]


# --- reading back -----------------------------------------------------------------------------


def test_plain_tarfile_sees_four_members_per_key_with_fixed_metadata(clean):
    for shard in list_shards(clean / "val"):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        keys = sorted({n.split(".", 1)[0] for n in names})
        assert keys == [f"val-{i:08d}" for i in range(6)]
        assert sorted(names) == sorted(f"{k}.{ext}" for k in keys for ext in ("flac", "json", "png", "txt"))
        assert {m.mtime for m in members} == {0}


def test_plain_webdataset_reads_every_member(clean):
    urls = [str(p) for p in list_shards(clean / "train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"train-{i:08d}" for i in range(48)]
    assert all({"png", "flac", "txt", "json"} <= s.keys() for s in samples)


def test_decoded_samples_equal_the_generated_ones(clean):
    source = SyntheticSource(N)
    for split, n in (("train", 48), ("test", 6)):
        decoded = list(iter_raw_samples(clean / split))
        assert len(decoded) == n
        for got, want in zip(decoded, source.samples(split, 0, n)):
            assert got["key"] == want["key"] and got["sample_rate"] == 16000
            assert got["image"].size == (64, 64) and got["image"].mode == "RGB"
            assert np.array_equal(np.asarray(got["image"]), np.asarray(want["image"]))  # png is lossless
            assert got["audio"].dtype == np.float32 and got["audio"].shape == (16000,)
            assert np.abs(got["audio"] - want["audio"]).max() <= 1 / 32768  # 16-bit PCM
            assert got["json"] == want["json"]
            attrs = Attributes(**{k: v for k, v in got["json"]["attributes"].items() if k != "position"})
            assert got["caption"] == caption(attrs)


def test_wav_option_writes_wav_members(tmp_path):
    plan = prepare_raw_dataset(tmp_path, SyntheticSource(5), shard_size=8, audio_format="wav")
    write_shards(plan)
    with tarfile.open(list_shards(tmp_path / "train")[0]) as tar:
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"png", "wav", "txt", "json"}
    sample = next(iter_raw_samples(tmp_path / "train"))
    assert sample["audio"].shape == (16000,) and sample["sample_rate"] == 16000


def test_missing_or_empty_split_names_the_command_that_creates_it(tmp_path):
    for split_dir in (tmp_path / "nope" / "train", tmp_path):
        with pytest.raises(UserError) as e:
            list_shards(split_dir)
        assert str(split_dir) in str(e.value) and "download_datasets.py --dataset synthetic" in str(e.value)


def test_a_corrupt_member_names_the_shard_and_the_key(tmp_path):
    shard = tmp_path / "train" / "shard-000000.tar"
    shard.parent.mkdir()
    good = encode_sample(make_sample(Attributes("red", "star", "large", 0, 0), "train", 0, seed=0))
    with wds.TarWriter(str(shard), encoder=False) as w:
        w.write({**good, "png": b"not a png"})
    with pytest.raises(UserError, match=r"shard-000000\.tar.*train-00000000"):
        list(iter_raw_samples(tmp_path / "train"))


def test_dotted_keys_are_refused():
    sample = make_sample(Attributes("red", "star", "large", 0, 0), "train", 0, seed=0)
    with pytest.raises(ValueError, match="no '.'"):
        encode_sample({**sample, "key": "train.0"})


# --- resume and mismatches --------------------------------------------------------------------


def test_resume_writes_only_the_missing_shard_and_equals_a_clean_run(clean, tmp_path):
    out = tmp_path / "killed"
    _write(out)
    (out / "train" / "shard-000001.tar").unlink()
    (out / "train" / ".tmp-shard-000002.tar.abc123").write_bytes(b"half a shard")  # killed mid-shard
    before = {p: p.stat().st_mtime_ns for p in (out / "train").glob("shard-*.tar")}

    plan = prepare_raw_dataset(out, SyntheticSource(N), shard_size=SHARD)
    assert [j.path.name for j in plan.pending] == ["shard-000001.tar"]
    assert plan.skipped == 4 and plan.removed_tmp == 1
    assert not (out / "train" / "index.json").exists()  # the index marks complete splits only
    assert (out / "val" / "index.json").exists()
    summaries = write_shards(plan)
    assert [(s.split, s.written, s.skipped) for s in summaries] == [("train", 1, 2), ("val", 0, 1), ("test", 0, 1)]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished shards untouched
    assert _digests(out) == _digests(clean)


def test_rerun_with_other_parameters_is_refused_and_names_them(clean, tmp_path):
    out = tmp_path / "ds"
    _write(out)
    for kwargs, name in ((dict(seed=1), "seed"), (dict(image_size=32), "image_size"),
                         (dict(shard_size=8), "shard_size"), (dict(holdout=False), "holdout"),
                         (dict(num_samples=61), "num_samples")):
        with pytest.raises(UserError, match=rf"{name}=.* there, .* now.*--overwrite"):
            _write(out, **kwargs)
    assert _digests(out) == _digests(clean)  # nothing was touched
    _write(out, seed=1, overwrite=True)
    assert json.loads((out / "dataset.json").read_text())["params"]["seed"] == 1
    assert _digests(out)["train/shard-000000.tar"] != _digests(clean)["train/shard-000000.tar"]


def test_overwrite_removes_shards_the_new_plan_does_not_have(tmp_path):
    _write(tmp_path, shard_size=8)
    _write(tmp_path, shard_size=16, overwrite=True)
    assert [p.name for p in list_shards(tmp_path / "train")] == [f"shard-{i:06d}.tar" for i in range(3)]


def test_shards_without_a_description_are_refused(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(UserError, match="dataset.json is missing"):
        _write(tmp_path)


def test_unknown_dataset_names_the_nearest_known_one():
    with pytest.raises(UserError, match=r"'synthetik'.*did you mean 'synthetic'.*known: synthetic"):
        get_dataset("synthetik")


# --- the script -------------------------------------------------------------------------------


@pytest.mark.slow
def test_script_bad_dataset_is_one_error_line_and_exit_2(tmp_path):
    r = run_script("download_datasets.py", "--dataset", "pixmo_capp", "--num_samples", "5", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and "synthetic" in r.stderr


@pytest.mark.slow
def test_script_end_to_end_and_rerun_skips(clean, tmp_path):
    args = ("--dataset", "synthetic", "--num_samples", str(N), "--out", str(tmp_path), "--shard_size", str(SHARD))
    r = run_script("download_datasets.py", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("train: 48 samples, 3 shards,") and lines[1].startswith("val: 6 samples, 1 shards,")
    assert lines[-1].startswith("done in")
    assert _digests(tmp_path) == _digests(clean)  # the script writes what the library writes

    r = run_script("download_datasets.py", *args)
    assert r.returncode == 0 and "skipped 5 finished shard(s) of 5" in r.stderr
    assert "(0 written, 3 skipped)" in r.stdout


def test_script_shows_the_fallback_warning_as_one_line(tmp_path, capsys):
    main = runpy.run_path(str(REPO / "scripts" / "download_datasets.py"))["main"]
    # 541 + 541 eval samples cannot all be distinct among 1080 combos
    args = ["--dataset", "synthetic", "--num_samples", "1082", "--split_fractions", "0", "0.5", "0.5"]
    assert main([*args, "--out", str(tmp_path), "--workers", "1", "--shard_size", "600"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "with replacement" in warning[0]
