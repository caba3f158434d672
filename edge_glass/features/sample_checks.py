"""Samples extraction refuses to store as features: degenerate raw inputs, non-finite outputs.

A NaN in one raw clip becomes NaN features, NaN manifest statistics, NaN standardised inputs
for every sample, a NaN loss, and (before metrics refused non-finite embeddings) a perfect
retrieval score. An empty caption or a one-sample clip is stored as features computed from
padding. So extraction checks each decoded sample (`raw_problem`) and each encoder output
(`nonfinite_samples`); by default a problem stops extraction naming the shard and the key, and
with `encoders.on_bad_sample: skip` the sample is left out and counted by reason in the shard's
record, the manifest and the end-of-run summary.
"""

from __future__ import annotations

import numpy as np
import torch

# Reasons, as counted in manifests.
EMPTY_CAPTION = "empty_caption"
NONFINITE_AUDIO = "nonfinite_audio"
SHORT_AUDIO = "short_audio"
SMALL_IMAGE = "small_image"
NONFINITE_FEATURES = "nonfinite_features"


def raw_problem(sample: dict, encoders: dict) -> tuple[str, str] | None:
    """(reason, detail) of what makes a decoded raw sample unusable for `encoders`, or None."""
    if "text" in encoders and not sample["caption"].strip():
        return EMPTY_CAPTION, "its caption is empty"
    audio_enc = encoders.get("audio")
    if audio_enc is not None and sample.get("audio") is not None:
        audio = np.asarray(sample["audio"])
        if not np.isfinite(audio).all():
            return NONFINITE_AUDIO, "its audio holds NaN or inf samples"
        seconds = audio.shape[0] / float(sample["sample_rate"])
        if seconds < audio_enc.cfg.min_seconds:
            return SHORT_AUDIO, f"its audio lasts {seconds:.3f} s, under encoders.audio.min_seconds {audio_enc.cfg.min_seconds:g}"
    vision_enc = encoders.get("vision")
    if vision_enc is not None and sample.get("image") is not None:
        width, height = sample["image"].size
        if min(width, height) < vision_enc.cfg.min_size:
            return SMALL_IMAGE, f"its image is {width}x{height}, under encoders.vision.min_size {vision_enc.cfg.min_size}"
    return None


def nonfinite_samples(rows: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[B] float (1: not finite) per sample, from its flat token rows and its pooled vector, on
    the device (the host reads it with the batch, no extra sync)."""
    bad_rows = (~torch.isfinite(rows).all(dim=1)).float()
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(rows.device, non_blocking=True)
    bad = torch.zeros(len(lengths), device=rows.device).index_add_(0, owner, bad_rows)
    return ((bad > 0) | ~torch.isfinite(pooled.float()).all(dim=1)).float()
