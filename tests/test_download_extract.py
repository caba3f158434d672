"""Feature extraction on the real sources' bi-modal raw sets: an image-only set (pixmo_cap) extracts
with a config that has no audio encoder, an audio-only set (audiocaps) with one that has no vision
encoder, and asking for a modality the set lacks names the sample and the encoder. Extraction
needed no change for this: raw samples now carry None for a missing image or audio, and the
driver already refuses a configured modality whose input is None."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import hf_tables
from helpers.download_world import fast_policy, hf_cache, pixmo_cap_world, server, write  # noqa: F401 (fixtures)
from helpers.media_server import audio_bytes

from edge_glass.config import config_from_dict
from edge_glass.data.audio_captions import AudioCapsSource
from edge_glass.data.pixmo import PixmoCapSource
from edge_glass.data.raw_shards import iter_raw_samples
from edge_glass.encoders.factory import build_encoders
from edge_glass.features.extract import extract_store
from edge_glass.features.store import open_store
from edge_glass.utils.errors import UserError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from edge_glass.local_models.build import build_local_models

    root = tmp_path_factory.mktemp("models")
    build_local_models(root, include_real=False, seed=0)
    return root


def _config(raw, store, encoders: dict, pair: str):
    return config_from_dict({
        "experiment": {"name": "real-bimodal"},
        "data": {"raw_dir": str(raw), "features_dir": str(store)},
        "encoders": {"batch_size": 4, **encoders},
        "model": {"adapters": {m: {"kind": "mlp"} for m in encoders}},
        "loss": {"pairs": {pair: 1.0}},
        "train": {"max_steps": 1},
    })


def _extract(cfg):
    return extract_store(cfg, build_encoders(cfg.encoders, torch.device("cpu")), ["hdf5"], splits=["train"])


@pytest.mark.slow
def test_image_only_set_extracts_without_an_audio_encoder(server, tmp_path, models):
    world = pixmo_cap_world(server, tmp_path / "table", good=6, slow=False)
    raw = tmp_path / "raw"
    write(PixmoCapSource(len(world.urls), hf_path=str(world.table), fractions=(1.0, 0.0, 0.0), fetch=fast_policy()), raw)
    keys = [s["key"] for s in iter_raw_samples(raw / "train")]

    encoders = {"vision": {"model": str(models / "clip-vision-tiny")}, "text": {"model": str(models / "sbert-tiny-random")}}
    _extract(_config(raw, tmp_path / "store", encoders, "vision_text"))
    store = open_store(tmp_path / "store", "train")
    block = store.read(0, len(store))
    assert block.keys == keys and set(block.modalities) == {"vision", "text"}
    assert set(json.loads((tmp_path / "store" / "train" / "manifest.json").read_text())["encoders"]) == {"vision", "text"}

    with_audio = {**encoders, "audio": {"model": str(models / "whisper-tiny-random"), "audio_seconds": 1.0}}
    with pytest.raises(UserError, match=rf"sample '{keys[0]}' has no audio, but encoders.audio is configured"):
        _extract(_config(raw, tmp_path / "s2", with_audio, "vision_text"))


@pytest.mark.slow
def test_audio_only_set_extracts_without_a_vision_encoder(tmp_path, models):
    table = hf_tables.audiocaps(tmp_path / "ac", [audio_bytes(i, fmt="FLAC", seconds=0.5) for i in range(5)], [1, 2, 1, 1, 1])
    raw = tmp_path / "raw"
    write(AudioCapsSource(5, hf_path=str(table), fractions=(1.0, 0.0, 0.0)), raw)
    encoders = {"audio": {"model": str(models / "whisper-tiny-random"), "audio_seconds": 1.0},
                "text": {"model": str(models / "sbert-tiny-random")}}
    _extract(_config(raw, tmp_path / "store", encoders, "audio_text"))
    store = open_store(tmp_path / "store", "train")
    block = store.read(0, len(store))
    assert len(block.keys) == 5 and set(block.modalities) == {"audio", "text"}
