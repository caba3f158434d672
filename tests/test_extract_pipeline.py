"""Extraction's pipeline: worker processes, layer capture, truncated encoders, spatial pooling.

    python -m pytest tests/test_extract_pipeline.py -q

- Decoding and preprocessing in 2 worker processes gives the same bytes as in the extracting
  process itself (and as 1 worker, what the shared reference store used).
- The CLIP hook captures exactly `hidden_states[layer]` for every layer; a Whisper encoder cut
  above the stored layer gives exactly `hidden_states[layer]` of the whole encoder.
- `encoders.vision.pool: 2` stores the means of 2x2 patch windows (4 of the tiny CLIP's 16), is
  recorded in the manifest, and a config whose pool differs from the store's is refused.
- Padding is cut on the device with the host's lengths, as a boolean mask would.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.feature_world import assert_same_store, encoders_for, feature_world

from edge_glass.config import AudioEncoderConfig, VisionEncoderConfig, config_from_dict
from edge_glass.encoders.clip_vision import ClipVisionEncoder, pool_grid
from edge_glass.encoders.whisper_audio import WhisperAudioEncoder
from edge_glass.features.extract import extract_store, flat_rows
from edge_glass.features.store import check_store_matches, open_store
from edge_glass.utils.errors import UserError


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


def _extract(world, store, workers, overrides=()):
    cfg = world.config(store, list(overrides))
    return extract_store(cfg, encoders_for(cfg), ["hdf5", "webdataset"], num_workers=workers)


def test_worker_processes_give_the_bytes_one_process_gives(world, tmp_path):
    _extract(world, tmp_path / "none", 0)
    _extract(world, tmp_path / "two", 2)
    assert_same_store(tmp_path / "none", tmp_path / "two")
    assert_same_store(tmp_path / "none", world.store)  # the reference store: the default worker count


def test_clip_hook_captures_each_hidden_layer(world):
    model_dir = str(world.models / "clip-vision-tiny")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = None
    for layer in range(-3, 3):  # the tiny CLIP has 2 layers: hidden states 0..2
        enc = ClipVisionEncoder(VisionEncoderConfig(model=model_dir, layer=layer, keep_cls=True), torch.device("cpu"),
                                torch.float32)
        if reference is None:
            reference = enc.model(pixel_values=pixels, output_hidden_states=True)
        out = enc.encode({"pixel_values": pixels})
        assert torch.equal(out.tokens, reference.hidden_states[layer]), layer
        assert torch.equal(out.pooled, reference.image_embeds)


def test_whisper_cut_above_the_stored_layer_equals_the_whole_encoder(world):
    model_dir = str(world.models / "whisper-tiny-random")
    full = None
    for layer in (-1, -2, 0, 1):
        enc = WhisperAudioEncoder(AudioEncoderConfig(model=model_dir, layer=layer, audio_seconds=1.0),
                                  torch.device("cpu"), torch.float32)
        t = torch.arange(16000) / 16000
        prepared = enc.prepare([(torch.sin(2 * torch.pi * f * t).numpy(), 16000) for f in (220.0, 440.0)])
        if full is None:
            whole = WhisperAudioEncoder(AudioEncoderConfig(model=model_dir, layer=-1, audio_seconds=1.0),
                                        torch.device("cpu"), torch.float32)
            full = whole.encoder(prepared["input_features"], output_hidden_states=True)
            layers = len(whole.encoder.layers)
        out = enc.encode(prepared)
        torch.testing.assert_close(out.tokens, full.hidden_states[layer], rtol=0, atol=1e-6)
        if layer % (layers + 1) < layers:
            assert len(enc.encoder.layers) == layer % (layers + 1) < layers  # the top layers are not run


def test_pool_grid_is_the_mean_of_each_window():
    grid = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4x4 grid, width 3
    pooled = pool_grid(grid, 2)
    assert pooled.shape == (2, 4, 3)
    g = grid.reshape(2, 4, 4, 3)
    want = torch.stack([g[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    torch.testing.assert_close(pooled, want)
    # An odd grid: the edge windows average the patches they cover.
    odd = torch.arange(25, dtype=torch.float32).reshape(1, 25, 1)
    pooled = pool_grid(odd, 2)
    assert pooled.shape == (1, 9, 1)
    assert float(pooled[0, 2, 0]) == (4 + 9) / 2 and float(pooled[0, 8, 0]) == 24


def test_pooled_store_keeps_a_quarter_of_the_patches_and_refuses_another_pool(world, tmp_path):
    store = tmp_path / "store"
    _extract(world, store, 0, ["encoders.vision.pool=2"])
    pooled, full = open_store(store, "val"), open_store(world.store, "val")
    assert pooled.manifest["encoders"]["vision"]["pool"] == 2
    assert pooled[0]["vision_tokens"].shape == (4, full[0]["vision_tokens"].shape[1])
    assert full[0]["vision_tokens"].shape[0] == 16
    assert pooled.encoder_fingerprint != full.encoder_fingerprint
    check_store_matches(pooled, world.config(store, ["encoders.vision.pool=2"]))
    with pytest.raises(UserError, match="encoders.vision.pool is 1 in the config but 2 in the store"):
        check_store_matches(pooled, world.config(store))


def test_flat_rows_keep_each_sample_s_true_length_in_order():
    tokens = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 2, 0])
    want = tokens[torch.arange(5)[None, :] < lengths[:, None]]
    assert torch.equal(flat_rows(tokens, lengths), want)
    assert torch.equal(flat_rows(tokens, torch.tensor([5, 5, 5])), tokens.reshape(15, 4))


def test_manifest_records_storage_and_both_fingerprints(world):
    manifest = json.loads((world.store / "train" / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["token_dtype"] == manifest["pooled_dtype"] == "float16"
    assert manifest["encoder_fingerprint"] != manifest["fingerprint"]
    assert "quantization" not in manifest
    cfg = config_from_dict(world.config_dict(world.store, ["features.token_dtype=int8"]))
    assert cfg.features.token_dtype == "int8"
