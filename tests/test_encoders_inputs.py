"""The frozen encoders (edge_glass.encoders) accept inputs as real datasets ship them: grey,
RGBA (transparency composited onto white), palette and 16-bit images of any size and aspect; and
stereo int16 audio at 44.1 or 8 kHz, cut when longer than the window and trimmed to true length
when shorter. A window longer than the model's is refused.

Run with:
    python -m pytest tests/test_encoders_inputs.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.feature_world import feature_world
from PIL import Image

from edge_glass.config import AudioEncoderConfig, VisionEncoderConfig
from edge_glass.encoders.clip_vision import ClipVisionEncoder
from edge_glass.encoders.images import to_rgb
from edge_glass.encoders.whisper_audio import WhisperAudioEncoder
from edge_glass.utils.errors import UserError

CPU = torch.device("cpu")
RATE = 16_000


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return feature_world(tmp_path_factory)


@pytest.fixture(scope="session")
def vision(world) -> ClipVisionEncoder:
    return ClipVisionEncoder(VisionEncoderConfig(model=str(world.models / "clip-vision-tiny")), CPU, torch.float32)


def audio_encoder(world, seconds: float = 1.0) -> WhisperAudioEncoder:
    cfg = AudioEncoderConfig(model=str(world.models / "whisper-tiny-random"), audio_seconds=seconds)
    return WhisperAudioEncoder(cfg, CPU, torch.float32)


@pytest.fixture(scope="session")
def audio(world) -> WhisperAudioEncoder:
    return audio_encoder(world)


def pixels(encoder: ClipVisionEncoder, image: Image.Image) -> torch.Tensor:
    return encoder.prepare([image])["pixel_values"][0]


def noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


# --- images -------------------------------------------------------------------------------------


def test_fully_transparent_rgba_is_white(vision):
    rgba = Image.fromarray(np.zeros((40, 40, 4), dtype=np.uint8), "RGBA")  # black, alpha 0
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    assert torch.equal(pixels(vision, rgba), pixels(vision, white))
    # Opaque RGBA is just its RGB.
    rgb = noise_rgb(40, 40)
    opaque = rgb.copy()
    opaque.putalpha(255)
    assert torch.equal(pixels(vision, opaque), pixels(vision, rgb))


def test_half_transparent_pixels_blend_with_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    value = np.asarray(to_rgb(rgba))
    assert value.shape == (4, 4, 3) and np.all(np.abs(value.astype(int) - 127) <= 1)


def test_grey_palette_and_16_bit_images(vision):
    rgb = noise_rgb(36, 36, seed=1)
    grey = rgb.convert("L")
    assert torch.equal(pixels(vision, grey), pixels(vision, grey.convert("RGB")))
    assert torch.equal(pixels(vision, grey.convert("LA")), pixels(vision, grey.convert("RGB")))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert torch.equal(pixels(vision, palette), pixels(vision, palette.convert("RGB")))
    # A palette image with a transparent index: those pixels become white, not the index's colour.
    transparent = Image.new("P", (36, 36), 0)
    transparent.putpalette([0, 0, 0] * 256)
    transparent.info["transparency"] = 0
    assert torch.equal(pixels(vision, transparent), pixels(vision, Image.new("RGB", (36, 36), "white")))
    # 16-bit grey (medical, scientific, PNG-16) scaled into 8 bits, not clipped to white.
    ramp = np.tile(np.linspace(0, 65535, 36).astype(np.uint16), (36, 1))
    deep = Image.fromarray(ramp)
    assert deep.mode.startswith("I;16")
    as8 = np.asarray(to_rgb(deep))[..., 0]
    np.testing.assert_allclose(as8, np.tile(np.linspace(0, 255, 36), (36, 1)), atol=1)


@pytest.mark.parametrize("size", [(64, 20), (20, 64), (5, 3), (300, 17), (32, 32), (1000, 1)])
def test_any_image_size_becomes_one_model_input(vision, size):
    batch = vision.prepare([noise_rgb(*size), noise_rgb(40, 40)])["pixel_values"]
    assert batch.shape == (2, 3, 32, 32) and torch.isfinite(batch).all()
    out = vision.encode({"pixel_values": batch})
    assert out.tokens.shape == (2, 16, 64) and out.lengths.tolist() == [16, 16]


# --- audio --------------------------------------------------------------------------------------


def tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)


def stereo_int16(rate: int, seconds: float) -> np.ndarray:
    x = tone(rate, seconds)
    return np.round(np.stack([x, x], axis=1) * 32767).astype(np.int16)  # soundfile's [samples, channels]


@pytest.mark.parametrize("rate", [44_100, 8_000, 16_000])
def test_stereo_int16_at_any_rate_matches_mono_float_at_16k(audio, rate):
    ref = audio.prepare([(tone(RATE, 1.0), RATE)])
    got = audio.prepare([(stereo_int16(rate, 1.0), rate)])
    assert got["lengths"].tolist() == [50]
    diff = (got["input_features"] - ref["input_features"]).abs()
    # Same sound, so the same log-mel up to int16 rounding and the resampler's edge transients
    # (a missed int16 scale or a channel dropped shifts the whole spectrogram by > 0.1).
    assert diff.mean() < 0.01
    assert diff[..., 2:-2].max() < 1e-3


def test_long_clips_are_cut_and_short_clips_keep_their_true_length(audio):
    prepared = audio.prepare([(tone(RATE, 2.5), RATE), (tone(RATE, 0.5), RATE), (tone(RATE, 1.0), RATE)])
    assert prepared["lengths"].tolist() == [50, 25, 50]
    # The long clip is its first second, exactly.
    assert torch.equal(prepared["input_features"][0], prepared["input_features"][2])
    out = audio.encode(prepared)
    assert out.lengths.tolist() == [50, 25, 50]
    # Frames past a clip's length are cut before storing (extraction keeps the first `lengths`);
    # the pooled vector is the mean of the true frames only.
    assert out.tokens[1, :25].abs().sum(-1).gt(0).all()
    torch.testing.assert_close(out.pooled[1], out.tokens[1, :25].float().mean(0))
    assert not torch.allclose(out.pooled[1], out.tokens[1].float().mean(0))


def test_channels_first_stereo_is_not_encoded_as_two_samples(audio):
    # torchaudio and librosa(mono=False) give [channels, samples]; taking that as soundfile's
    # [samples, channels] would average over time and encode a clip of 2 samples.
    x = tone(44_100, 1.0)
    channels_first = np.stack([x, x], axis=0)
    try:
        lengths = audio.prepare([(channels_first, 44_100)])["lengths"].tolist()
    except (UserError, ValueError):
        return
    assert lengths == [50], "a [2, 44100] stereo clip was encoded as a 2-sample clip"


def test_shorter_window_than_the_model_cuts_clips(world):
    half = audio_encoder(world, 0.5)
    assert half.prepare([(tone(RATE, 1.0), RATE)])["lengths"].tolist() == [25]
    assert half.describe()["preprocessing"]["window_seconds"] == 0.5


def test_window_longer_than_the_model_is_refused(world):
    with pytest.raises(UserError, match=r"encoders\.audio\.audio_seconds: 2(\.0)? s exceeds the 1 s window"):
        audio_encoder(world, 2.0)
