"""Fusing the vision and audio embeddings into one, for tri-modal retrieval against text.

The fused embedding is built from vision and audio only, never from the caption it is then
scored against (the prototype leaked it).
"""

from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    """Linear map of [vision; audio]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim))

    def forward(self, vision: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([vision, audio], dim=-1))


class GatedFusion(nn.Module):
    """Per-dimension gate g(v, a) in (0, 1): g * vision + (1 - g) * audio."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, vision: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([vision, audio], dim=-1)))
        return g * vision + (1 - g) * audio


class CrossAttentionFusion(nn.Module):
    """A learned query attends over the two modality embeddings as a 2-token sequence."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, vision: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        kv = self.norm(torch.stack([vision, audio], dim=1))
        fused, _ = self.attn(self.query.expand(kv.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.out(fused[:, 0])


FUSIONS = {"concat": ConcatFusion, "gated": GatedFusion, "cross_attention": CrossAttentionFusion}
