"""The audio-caption downloader (audiocaps), offline: a local table with AudioCaps' columns and
real encoded clips. One sample per clip with all its captions, audio resampled to 16 kHz mono,
undecodable or missing clips skipped and counted, and the set recorded as audio + text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import hf_tables
from helpers.download_world import hf_cache, write  # noqa: F401 (fixture)
from helpers.media_server import GARBAGE, audio_bytes

from edge_glass.data.audio_captions import AudioCapsSource
from edge_glass.data.raw_shards import iter_raw_samples
from edge_glass.utils.errors import UserError

CAPTIONS = [1, 5, 1, 2, 1, 1, 1, 1]  # AudioCaps: one row per caption; val/test clips have five


@pytest.fixture
def table(tmp_path):
    clips = [audio_bytes(i, fmt="FLAC", rate=32000, seconds=0.5) for i in range(6)]
    clips[2] = audio_bytes(2, fmt="OGG", rate=22050, seconds=0.5)  # any format libsndfile reads
    clips += [GARBAGE, None]  # a clip that does not decode, a row without audio bytes
    return hf_tables.audiocaps(tmp_path / "audiocaps", clips, CAPTIONS)


def test_audiocaps_one_sample_per_clip_with_every_caption(table, tmp_path):
    source = AudioCapsSource(len(CAPTIONS), hf_path=str(table), fractions=(1.0, 0.0, 0.0))
    out = tmp_path / "out"
    _, summaries = write(source, out, shard_size=3)

    report = json.loads((out / "skipped.json").read_text())
    assert report["by_reason"] == {"undecodable": 1, "missing_fields": 1}
    assert {e["clip"]: e["reason"] for e in report["samples"]} == {"yt006@30": "undecodable", "yt007@30": "missing_fields"}

    samples = list(iter_raw_samples(out / "train"))
    assert len(samples) == 6 and summaries[0].samples == 6
    for s in samples:
        c = int(s["json"]["youtube_id"][2:])
        assert s["image"] is None and s["sample_rate"] == 16000 and s["audio"].dtype == np.float32
        assert s["audio"].ndim == 1 and abs(s["audio"].shape[0] - 8000) <= 2  # 0.5 s, resampled from 32/22.05 kHz
        expected = [f"Clip {c} sounds like this, take {j}." for j in range(CAPTIONS[c])]
        assert s["caption"] == expected[0] and s["json"]["captions"] == expected
        assert s["json"]["clip"] == f"yt{c:03d}@30" and s["json"]["caption_kind"] == "caption"
        # the tone survives decoding and resampling: its pitch is where the maker put it
        spectrum = np.abs(np.fft.rfft(s["audio"]))
        assert abs(np.argmax(spectrum) * 16000 / s["audio"].shape[0] - (220 + 40 * c)) < 4
    desc = json.loads((out / "dataset.json").read_text())
    assert desc["modalities"] == ["audio", "text"] and desc["params"]["sample_rate"] == 16000


def test_audiocaps_keeps_the_native_rate_on_request(table, tmp_path):
    source = AudioCapsSource(len(CAPTIONS), hf_path=str(table), fractions=(1.0, 0.0, 0.0), sample_rate=0)
    write(source, tmp_path / "out", shard_size=8)
    rates = {s["json"]["youtube_id"]: s["sample_rate"] for s in iter_raw_samples(tmp_path / "out" / "train")}
    assert rates["yt002"] == 22050 and rates["yt000"] == 32000


def test_audiocaps_refuses_a_table_without_captions_or_a_silly_rate(tmp_path, table):
    from datasets import Dataset

    (tmp_path / "bad" / "data").mkdir(parents=True)
    Dataset.from_dict({"audio_path": ["a.wav"], "label": ["dog"]}).to_parquet(str(tmp_path / "bad" / "data" / "train-0.parquet"))
    with pytest.raises(UserError, match=r"missing column\(s\) audio, caption or captions or caption_1"):
        AudioCapsSource(1, hf_path=str(tmp_path / "bad"))
    with pytest.raises(UserError, match="--sample_rate"):
        AudioCapsSource(1, hf_path=str(table), sample_rate=100)
