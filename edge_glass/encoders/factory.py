"""Build the frozen encoders a config names."""

from __future__ import annotations

import torch

from edge_glass.config import EncodersConfig
from edge_glass.encoders.base import FrozenEncoder, resolve_dtype
from edge_glass.modalities import resolve, spec


def build_encoders(cfg: EncodersConfig, device: torch.device) -> dict[str, FrozenEncoder]:
    """One encoder per enabled modality, in the modality table's order (edge_glass/modalities.py)."""
    encoders = {}
    for modality in cfg.enabled():
        sub = getattr(cfg, modality)
        encoders[modality] = resolve(spec(modality).encoder)(sub, device, resolve_dtype(sub.dtype, device))
    return encoders
