"""The tri-modal downloader (localized_narratives), offline: a JSONL with Localized Narratives'
fields, images and voice recordings served locally through --mirror. Each sample is the image,
the annotator's recording and its transcription; narratives of one image share a split; rows
whose image has no public URL, and recordings that fail, are skipped and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import hf_tables
from helpers.download_world import fast_policy, hf_cache, server, write  # noqa: F401 (fixtures)
from helpers.media_server import GARBAGE, audio_bytes, image_bytes

from edge_glass.data.hf_rows import DEFAULT_FRACTIONS, split_of
from edge_glass.data.http_fetch import parse_mirrors
from edge_glass.data.narratives import COCO_BASE, VOICE_BASE, LocalizedNarrativesSource, image_url
from edge_glass.data.raw_shards import iter_raw_samples
from edge_glass.utils.errors import UserError


@pytest.fixture
def ln(server, tmp_path):
    entries = []
    for i in range(10):
        server.add(f"/coco/val2017/{i:012d}.jpg", image_bytes(i, fmt="JPEG"))
        server.add(f"/voice/coco_val/coco_val_{i}_7.ogg", audio_bytes(i, seconds=0.4))
        entries.append({"image_id": i, "voice_recording": f"coco_val/coco_val_{i}_7.ogg"})
    # a second narrative of image 1 by another annotator (same image, its own voice)
    server.add("/voice/coco_val/coco_val_1_9.ogg", audio_bytes(11, seconds=0.4))
    entries.append({"image_id": 1, "annotator_id": 9, "voice_recording": "coco_val/coco_val_1_9.ogg"})
    entries.append({"image_id": 3, "voice_recording": "coco_val/missing.ogg"})  # 404
    server.add("/voice/coco_val/broken.ogg", GARBAGE)
    entries.append({"image_id": 4, "voice_recording": "coco_val/broken.ogg"})  # undecodable
    entries.append({"image_id": "abc123", "dataset_id": "flickr30k_val", "voice_recording": "x.ogg"})  # no URL
    path = hf_tables.narratives(tmp_path / "ln" / "coco_val_localized_narratives.jsonl", entries)
    mirrors = parse_mirrors([f"{COCO_BASE}={server.url('/coco/')}", f"{VOICE_BASE}={server.url('/voice/')}"])
    return path, entries, fast_policy(mirrors=mirrors)


def test_narratives_pair_image_voice_and_transcription(ln, tmp_path):
    path, entries, policy = ln
    source = LocalizedNarrativesSource(len(entries), hf_path=str(path.parent), fetch=policy)
    out = tmp_path / "out"
    write(source, out)

    report = json.loads((out / "skipped.json").read_text())
    assert report["by_reason"] == {"bad_url": 1, "undecodable": 1, "no_image_url": 1}
    assert {e["reason"]: e["image"] for e in report["samples"]} == {
        "bad_url": "mscoco_val2017/3", "undecodable": "mscoco_val2017/4", "no_image_url": "flickr30k_val/abc123"}

    samples = [s for split in ("train", "val", "test") if list((out / split).glob("*.tar"))
               for s in iter_raw_samples(out / split)]
    assert len(samples) == 11
    voices = set()
    for s in samples:
        meta = s["json"]
        i = int(meta["image_id"])
        assert s["image"].size == (48, 40) and s["image"].format == "JPEG"
        assert s["sample_rate"] == 16000 and s["audio"].shape == (6400,)
        assert s["caption"] == f"In this image there is thing {i}." and meta["caption_kind"] == "transcription"
        assert meta["image_url"] == f"{COCO_BASE}val2017/{i:012d}.jpg"  # the dataset's URL, fetched via the mirror
        assert meta["split"] == split_of(f"mscoco_val2017/{i}", 0, DEFAULT_FRACTIONS)  # split by image
        assert meta["timed_caption"][0]["utterance"] == "In this"
        # the recording is this narrative's: its pitch is the one served for this voice file
        tone = 220 + 40 * (11 if meta["annotator_id"] == 9 else i)
        assert abs(np.argmax(np.abs(np.fft.rfft(s["audio"]))) * 16000 / 6400 - tone) < 5
        voices.add(meta["voice_url"])
    assert len(voices) == 11  # two narratives of image 1, two different recordings
    desc = json.loads((out / "dataset.json").read_text())
    assert desc["modalities"] == ["vision", "audio", "text"] and desc["source"] == "localized_narratives"


def test_image_urls_by_dataset():
    assert image_url({"dataset_id": "mscoco_val2017", "image_id": "137576"}) == \
        "http://images.cocodataset.org/val2017/000000137576.jpg"
    assert image_url({"dataset_id": "mscoco_train2017", "image_id": 9}) == \
        "http://images.cocodataset.org/train2017/000000000009.jpg"
    assert image_url({"dataset_id": "open_images_validation", "image_id": "0a1b2c"}) == \
        "https://s3.amazonaws.com/open-images-dataset/validation/0a1b2c.jpg"
    assert image_url({"dataset_id": "ade20k_train", "image_id": "ADE_train_1"}) is None
    assert image_url({"dataset_id": "flickr30k_val", "image_id": "1", "image_url": "http://x/1.jpg"}) == "http://x/1.jpg"


def test_default_annotations_are_downloaded_once_through_the_fetcher(ln, server):
    path, entries, policy = ln
    server.add("/ln/annotations/coco_val_localized_narratives.jsonl", path.read_bytes())
    policy = fast_policy(mirrors=(*policy.mirrors, ("https://storage.googleapis.com/localized-narratives/",
                                                   server.url("/ln/"))))
    source = LocalizedNarrativesSource(5, fetch=policy)  # no --hf_path: Google's COCO val file
    assert sum(source.split_sizes().values()) == 5 and source.params()["hf_rows"] == len(entries)
    assert source.params()["annotations"].startswith("https://storage.googleapis.com/localized-narratives/annotations/")
    LocalizedNarrativesSource(5, fetch=policy)
    assert server.hits["/ln/annotations/coco_val_localized_narratives.jsonl"] == 1  # cached after the first


def test_unreachable_annotations_are_one_clear_line(server):
    policy = fast_policy(mirrors=(("https://storage.googleapis.com/localized-narratives/", server.url("/nothing/")),))
    with pytest.raises(UserError, match=r"cannot download the Localized Narratives annotations \(bad_url: .*HTTP 404.*--hf_path"):
        LocalizedNarrativesSource(5, fetch=policy)
