"""The raw-shard format with optional media and fetching sources (edge_glass.data.raw_shards):
a sample may lack its image or its audio, encoded images pass through untouched, dataset.json
records the modalities, and a fetching source's shards are complete exactly when their record
is (so a shard whose candidates all failed has no tar, and a resume redoes only what is missing).
The source here is an in-memory stand-in, so these tests are about the writer alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers.download_world import digests
from helpers.media_server import image_bytes

from edge_glass.data.raw_shards import (
    SkippedSample,
    decode_sample,
    encode_sample,
    iter_raw_samples,
    list_shards,
    prepare_raw_dataset,
    write_shards,
)
from edge_glass.data.synthetic import SyntheticSource
from edge_glass.utils.errors import UserError


@dataclass(frozen=True)
class Task:
    key: str
    index: int


class FakeFetchingSource:
    """Candidate i of train is a JPEG-carrying image+text sample unless i is in `fail`."""

    name = "fake"
    modalities = ("vision", "text")
    fetch_workers = 3

    def __init__(self, n: int, fail: set[int] = frozenset(), seed: int = 0) -> None:
        self.n, self.fail, self.seed = n, set(fail), seed
        self.realized: list[int] = []

    def params(self) -> dict:
        return {"n": self.n, "seed": self.seed}

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n, "val": 0, "test": 0}

    def tasks(self, split, start, stop):
        return [Task(f"{split}-{i:08d}", i) for i in range(start, stop)]

    def samples(self, split, start, stop):  # the protocol's sequential form; the writer uses realize
        raise AssertionError("a fetching source is realised on the thread pool")

    def realize(self, task: Task):
        self.realized.append(task.index)
        if task.index in self.fail:
            raise SkippedSample("bad_url", f"candidate {task.index} is gone", url=f"http://x/{task.index}.jpg")
        return {"key": task.key, "image": None, "image_bytes": image_bytes(task.index, fmt="JPEG"), "image_format": "jpg",
                "audio": None, "sample_rate": None, "caption": f"picture {task.index}", "json": {"i": task.index}}


def _write(out: Path, source, overwrite: bool = False):
    plan = prepare_raw_dataset(out, source, shard_size=4, overwrite=overwrite)
    return plan, write_shards(plan)


def test_media_are_optional_and_encoded_images_pass_through():
    jpeg = image_bytes(3, fmt="JPEG")
    text_only = encode_sample({"key": "k", "image": None, "audio": None, "sample_rate": None, "caption": "c", "json": {}})
    assert set(text_only) == {"__key__", "txt", "json"}
    got = decode_sample(text_only)
    assert got["image"] is None and got["audio"] is None and got["sample_rate"] is None and got["caption"] == "c"

    members = encode_sample({"key": "k", "image": None, "image_bytes": jpeg, "image_format": "jpg",
                             "audio": np.zeros(160, np.float32), "sample_rate": 16000, "caption": "c", "json": {}})
    assert members["jpg"] == jpeg and "png" not in members and "flac" in members
    got = decode_sample(members)
    assert got["image"].format == "JPEG" and got["image"].size == (48, 40) and got["audio"].shape == (160,)
    with pytest.raises(ValueError, match="image_format"):
        encode_sample({"key": "k", "image": None, "image_bytes": jpeg, "image_format": "gif", "audio": None,
                       "sample_rate": None, "caption": "c", "json": {}})


def test_synthetic_records_all_three_modalities(tmp_path):
    write_shards(prepare_raw_dataset(tmp_path, SyntheticSource(5), shard_size=8))
    assert json.loads((tmp_path / "dataset.json").read_text())["modalities"] == ["vision", "audio", "text"]
    assert not (tmp_path / "skipped.json").exists() and not list(tmp_path.rglob("shard-*.json"))


def test_fetching_source_shards_records_and_an_all_failed_shard(tmp_path):
    source = FakeFetchingSource(12, fail={1, 4, 5, 6, 7})  # shard 1 (candidates 4-7) loses everything
    _, summaries = _write(tmp_path, source)
    train = tmp_path / "train"
    assert sorted(p.name for p in train.iterdir()) == [
        "index.json", "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000002.json", "shard-000002.tar"]
    assert json.loads((train / "shard-000001.json").read_text())["samples"] == 0
    index = json.loads((train / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == ["shard-000000.tar", "shard-000002.tar"]
    assert (index["total"], index["candidates"], index["skipped"]) == (7, 12, {"bad_url": 5})
    assert (summaries[0].samples, summaries[0].candidates, summaries[0].skipped_samples) == (7, 12, {"bad_url": 5})
    assert [s["json"]["i"] for s in iter_raw_samples(train)] == [0, 2, 3, 8, 9, 10, 11]  # order kept, holes skipped
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert [e["key"] for e in report["samples"]] == [f"train-{i:08d}" for i in (1, 4, 5, 6, 7)]
    assert report["samples"][0] == {"split": "train", "key": "train-00000001", "reason": "bad_url",
                                    "detail": "candidate 1 is gone", "url": "http://x/1.jpg"}
    assert [p.name for p in list_shards(train)] == ["shard-000000.tar", "shard-000002.tar"]


def test_fetching_resume_redoes_only_shards_without_a_record(tmp_path):
    clean = tmp_path / "clean"
    _write(clean, FakeFetchingSource(12, fail={1, 4, 5, 6, 7}))
    out = tmp_path / "out"
    _write(out, FakeFetchingSource(12, fail={1, 4, 5, 6, 7}))
    # As a kill leaves it: shard 2's tar renamed but its record not yet written, shard 1's record
    # gone, a half-written temporary, and no index or skipped.json.
    for name in ("shard-000002.json", "shard-000001.json", "index.json"):
        (out / "train" / name).unlink()
    (out / "skipped.json").unlink()
    (out / "train" / ".tmp-shard-000003.tar.x1").write_bytes(b"half")
    kept = (out / "train" / "shard-000000.tar").stat().st_mtime_ns

    source = FakeFetchingSource(12, fail={1, 4, 5, 6, 7})
    plan, _ = _write(out, source)
    assert [j.path.name for j in plan.pending] == ["shard-000001.tar", "shard-000002.tar"] and plan.removed_tmp == 1
    assert sorted(source.realized) == list(range(4, 12))  # shard 0's candidates were not fetched again
    assert (out / "train" / "shard-000000.tar").stat().st_mtime_ns == kept
    assert digests(out) == digests(clean)


def test_fetching_overwrite_removes_records_and_report(tmp_path):
    _write(tmp_path, FakeFetchingSource(12, fail={1}))
    with pytest.raises(UserError, match=r"n=12 there, 8 now"):
        _write(tmp_path, FakeFetchingSource(8))
    _write(tmp_path, FakeFetchingSource(8), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").glob("shard-*")) == [
        "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar"]
    assert json.loads((tmp_path / "skipped.json").read_text())["skipped"] == 0
