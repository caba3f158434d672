"""Build the frozen encoders a config names."""

from __future__ import annotations

import torch

from edge_glass.config import EncodersConfig
from edge_glass.encoders.base import FrozenEncoder, resolve_dtype


def build_encoders(cfg: EncodersConfig, device: torch.device) -> dict[str, FrozenEncoder]:
    """One encoder per enabled modality, in the order vision, audio, text."""
    from edge_glass.encoders.clip_vision import ClipVisionEncoder
    from edge_glass.encoders.sbert_text import SentenceTransformerTextEncoder
    from edge_glass.encoders.whisper_audio import WhisperAudioEncoder

    classes = {"vision": ClipVisionEncoder, "audio": WhisperAudioEncoder, "text": SentenceTransformerTextEncoder}
    encoders = {}
    for modality in cfg.enabled():
        sub = getattr(cfg, modality)
        encoders[modality] = classes[modality](sub, device, resolve_dtype(sub.dtype, device))
    return encoders
