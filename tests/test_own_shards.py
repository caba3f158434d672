"""A user's own WebDataset shards (`--dataset webdataset`): img2dataset's layout (`00000.tar` of
jpg + txt + json, beside its `_stats.json` and `.parquet`) and a WebP + MP3 set with its caption and
label in the JSON go through import, extraction, training and evaluation; bad shards, broken
mappings and the three ways of naming shards are tested on their own."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from helpers.trainer_world import ZERO2, run_script, train
from PIL import Image

from edge_glass.data.raw_shards import iter_raw_samples
from edge_glass.data.webdataset_import import WebDatasetSource, shard_paths
from edge_glass.utils.errors import UserError

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def _image(colour: str, fmt: str, i: int) -> bytes:
    img = Image.new("RGB", (40, 40), COLOURS[colour])
    img.paste((255, 255, 255), (4 + i % 20, 4 + i % 17, 14 + i % 20, 14 + i % 17))  # a little square that moves
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _audio(i: int, fmt: str) -> bytes:
    t = np.arange(8000) / 16000
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 4)) * t)).astype(np.float32), 16000, format=fmt)
    return out.getvalue()


def _tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def img2dataset_dir(root: Path, shards: int = 3, per_shard: int = 24) -> Path:
    """img2dataset's output: NNNNN.tar with key.jpg / key.txt / key.json, stats and parquet beside."""
    root.mkdir(parents=True)
    names = list(COLOURS)
    for s in range(shards):
        samples = []
        for j in range(per_shard):
            i = s * per_shard + j
            colour = names[i % len(names)]
            key = f"{s:05d}{j:04d}"
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "caption": f"a {colour} picture",
                    "width": 40, "height": 40}
            samples.append({"__key__": key, "jpg": _image(colour, "JPEG", i), "txt": f"a {colour} picture".encode(),
                            "json": json.dumps(meta).encode()})
        _tar(root / f"{s:05d}.tar", samples)
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
        (root / f"{s:05d}.parquet").write_bytes(b"PAR1 not read")
    return root


def webp_mp3_dir(root: Path, n: int = 72) -> Path:
    """A WebP + MP3 set whose caption and class are JSON fields (no txt member)."""
    root.mkdir(parents=True)
    names = list(COLOURS)
    samples = []
    for i in range(n):
        colour = names[i % len(names)]
        samples.append({"__key__": f"clip{i:05d}", "webp": _image(colour, "WEBP", i), "mp3": _audio(i, "MP3"),
                        "json": json.dumps({"text": f"the {colour} one", "class": colour}).encode()})
    _tar(root / "part-a.tar", samples[: n // 2])
    _tar(root / "part-b.tar", samples[n // 2 :])
    return root


def _import(out: Path, *args: str) -> str:
    result = run_script(out.parent, "download_datasets.py", "--dataset", "webdataset", "--out", str(out), *args)
    result.check()
    return result.stdout + result.stderr


def _config(tmp: Path, raw: Path, models: Path, encoders: dict, pairs: dict) -> Path:
    cfg = {
        "experiment": {"name": "own"},
        "data": {"raw_dir": str(raw), "features_dir": str(tmp / "store"), "micro_batch_size": 8, "eval_batch_size": 16},
        "encoders": {"batch_size": 16, **encoders},
        "model": {"shared_dim": 32, "mrl_dims": [16], "adapters": {m: {"kind": "mlp", "hidden_dim": 32} for m in encoders}},
        "loss": {"pairs": pairs},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 6, "eval_interval": 6, "save_interval": 6, "precision": "fp32", "deepspeed": str(ZERO2)},
    }
    path = tmp / "own.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _extract_train_evaluate(tmp: Path, config: Path) -> dict:
    run_script(tmp, "extract_features.py", "--config", str(config)).check()
    result = train(tmp, config)
    assert result.returncode == 0, str(result)
    run_script(tmp, "evaluate.py", "--run", str(tmp / "runs" / "own"), "--split", "val", "--device", "cpu").check()
    (report,) = (tmp / "runs" / "own" / "eval").glob("val-*.json")
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from edge_glass.local_models.build import build_local_models

    root = tmp_path_factory.mktemp("models")
    build_local_models(root, include_real=False, seed=0)
    return root


@pytest.mark.slow
def test_img2dataset_output_imports_trains_and_evaluates_with_a_bad_image_skipped_and_counted(tmp_path, models):
    shards = img2dataset_dir(tmp_path / "img2dataset")
    # One sample's JPEG is cut in half: skipped and counted, not the import.
    with tarfile.open(shards / "00001.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    broken = sorted(k for k in members if k.endswith(".jpg"))[3]
    members[broken] = members[broken][: len(members[broken]) // 2]
    _tar(shards / "00001.tar", [{"__key__": k, **{n.split(".", 1)[1]: v for n, v in members.items() if n.startswith(k + ".")}}
                                for k in dict.fromkeys(n.split(".", 1)[0] for n in members)])
    raw = tmp_path / "raw"
    out = _import(raw, "--source", str(shards), "--split_fractions", "0.6", "0.2", "0.2")
    assert "kept 71 of 72 candidate samples; skipped 1 (undecodable 1)" in out
    samples = {s["json"]["wds"]["key"]: s for split in ("train", "val", "test") for s in iter_raw_samples(raw / split)}
    assert len(samples) == 71 and broken.split(".")[0] not in samples
    one = samples["000000005"]
    assert one["caption"] == "a green picture" and one["image"].size == (40, 40)
    assert one["json"]["meta"]["url"] == "https://example.com/000000005.jpg" and one["json"]["wds"]["shard"] == "00000.tar"
    assert json.loads((raw / "dataset.json").read_text())["modalities"] == ["vision", "text"]
    # A second run with the same arguments has nothing left to do.
    again = _import(raw, "--source", str(shards), "--split_fractions", "0.6", "0.2", "0.2")
    assert "skipped 3 finished shard(s) of 3" in again and "0 candidate samples processed" in again

    encoders = {"vision": {"model": str(models / "clip-vision-tiny")}, "text": {"model": str(models / "sbert-tiny-random")}}
    report = _extract_train_evaluate(tmp_path, _config(tmp_path, raw, models, encoders, {"vision_text": 1.0}))
    assert report["num_samples"] == len(list(iter_raw_samples(raw / "val")))
    assert {r["pair"] for r in report["rows"]} == {"vision_text"} and all(0 <= r["R@1"] <= 1 for r in report["rows"])


@pytest.mark.slow
def test_webp_and_mp3_shards_with_json_captions_and_labels_train_and_score_by_label(tmp_path, models):
    shards = webp_mp3_dir(tmp_path / "wds")
    raw = tmp_path / "raw"
    _import(raw, "--source", str(shards / "part-{a,b}.tar"), "--map", "caption=json.text", "--map", "label=json.class",
            "--split_fractions", "0.5", "0.25", "0.25")
    samples = [s for split in ("train", "val", "test") for s in iter_raw_samples(raw / split)]
    assert len(samples) == 72
    first = next(s for s in samples if s["json"]["wds"]["key"] == "clip00002")
    assert first["caption"] == "the blue one" and first["json"]["label"] == "blue"
    assert first["image"].format == "PNG", "WebP is re-encoded losslessly as PNG"
    assert first["sample_rate"] == 16000 and 0.45 < len(first["audio"]) / 16000 < 0.6  # MP3 decoded (codec padding)
    assert json.loads((raw / "dataset.json").read_text())["modalities"] == ["vision", "audio", "text"]

    encoders = {"vision": {"model": str(models / "clip-vision-tiny")},
                "audio": {"model": str(models / "whisper-tiny-random"), "audio_seconds": 1.0},
                "text": {"model": str(models / "sbert-tiny-random")}}
    report = _extract_train_evaluate(tmp_path, _config(tmp_path, raw, models, encoders, {"vision_text": 1.0, "audio_text": 1.0}))
    # Samples of one colour share a label: the multi-positive numbers are reported beside the strict ones.
    assert all("group_R@1" in r and r["group_R@1"] >= r["R@1"] for r in report["rows"])


def test_a_broken_mapping_is_one_line_listing_what_the_first_sample_has(tmp_path):
    shards = img2dataset_dir(tmp_path / "img2dataset", shards=1, per_shard=3)
    with pytest.raises(UserError, match=r"--map caption=json\.text: the first sample \('000000000' in .*00000\.tar\) has "
                                        r"no json\.text; its members: jpg, json, txt; its json fields: caption, height, key"):
        WebDatasetSource(str(shards), field_map=["caption=json.text"])
    with pytest.raises(UserError, match="unknown field 'captoin'"):
        WebDatasetSource(str(shards), field_map=["captoin=txt"])
    with pytest.raises(UserError, match="expected FIELD=SOURCE"):
        WebDatasetSource(str(shards), field_map=["caption"])
    result = run_script(tmp_path, "download_datasets.py", "--dataset", "webdataset", "--source", str(shards),
                        "--map", "image=png", "--out", str(tmp_path / "raw"))
    assert result.returncode != 0 and "--map image=png: the first sample" in result.stderr.strip().splitlines()[-1]


def test_shards_named_by_folder_brace_pattern_or_list_file_are_the_same(tmp_path):
    shards = img2dataset_dir(tmp_path / "d", shards=3, per_shard=2)
    listing = tmp_path / "d" / "shards.txt"
    listing.write_text("# my shards\n00000.tar\n00001.tar\n00002.tar\n")
    expected = [shards / f"{i:05d}.tar" for i in range(3)]
    assert shard_paths(str(shards)) == expected
    assert shard_paths(str(shards / "{00000..00002}.tar")) == expected
    assert shard_paths(str(listing)) == expected
    with pytest.raises(UserError, match=r"1 of 4 shard\(s\) not found, first .*00003\.tar"):
        shard_paths(str(shards / "{00000..00003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards"):
        shard_paths(str(tmp_path / "empty"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(UserError, match="junk.tar: not a readable tar shard"):
        WebDatasetSource(str(tmp_path / "junk.tar"))
    # Splits come from a hash of shard and key: the same sample lands in the same split when shards are added.
    two = WebDatasetSource(str(shards / "{00000..00001}.tar"), fractions=(0.5, 0.5, 0.0))
    three = WebDatasetSource(str(shards), fractions=(0.5, 0.5, 0.0))
    split_of = lambda src: {c.data["key"]: s for s in ("train", "val") for c in src.tasks(s, 0, 10**6)}  # noqa: E731
    assert split_of(two).items() <= split_of(three).items()
