"""Bring audio as real datasets ship it (any rate, any channel count, int or float) to mono float32."""

from __future__ import annotations

import numpy as np
import soxr


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Mix down to one channel. Accepts [samples] or [samples, channels] (soundfile's layout)."""
    audio = np.asarray(audio)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:
        if audio.shape[0] < audio.shape[1] and audio.shape[0] <= 8:
            audio = audio.T  # [channels, samples] (torchaudio, librosa)
        audio = audio.mean(axis=1)
    elif audio.ndim != 1:
        raise ValueError(f"audio must be [samples] or [samples, channels], got shape {audio.shape}")
    return audio


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Resample with libsoxr (high quality, maintained) rather than a hand-rolled filter."""
    if rate == target:
        return audio
    return soxr.resample(audio, rate, target, quality="HQ").astype(np.float32, copy=False)


def prepare_waveform(audio: np.ndarray, rate: int, target_rate: int, max_seconds: float) -> np.ndarray:
    """Mono, resampled to `target_rate`, cut to at most `max_seconds`."""
    wave = resample(to_mono(audio), rate, target_rate)
    return wave[: int(round(max_seconds * target_rate))]
