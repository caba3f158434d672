"""Per-modality adapters from frozen-encoder features into the shared embedding space.

    MLPProjector      pooled vector [B, P]            -> [B, D]
    AttentionPool     tokens [B, T, E] + mask [B, T]  -> [B, D]   (learned query, multi-head)
    PerceiverAdapter  tokens [B, T, E] + mask [B, T]  -> [B, D]   (Perceiver resampler, then pool)

Every adapter first z-scores its input with the train split's per-dimension statistics
(`Standardize`: a random Whisper's features carry large per-dimension offsets, and without
standardisation the contrastive loss stays at chance; see `edge_glass/features/stats.py`) and
honours the token mask, so the values at padded positions never reach the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_glass.config import AdapterConfig
from edge_glass.features.quantize import dequantize_features


class Standardize(nn.Module):
    """(x - mean) / std per dimension, with fixed statistics stored as buffers."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, enabled: bool = True) -> None:
        super().__init__()
        # A dimension that never varies would divide by ~0 and blow up float noise; floor the
        # std at a small fraction of the typical one.
        floor = torch.clamp(std.mean() * 1e-3, min=1e-6)
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", torch.clamp(std.float(), min=floor))
        self.enabled = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return (x - self.mean) / self.std


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, dropout: float) -> nn.Sequential:
    """`layers` Linear layers with GELU between them (1 is a plain linear map)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*mods)


class MLPProjector(nn.Module):
    """LayerNorm then an MLP over the pooled vector (LLaVA's projector, on pooled features)."""

    uses_tokens = False

    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = mlp(in_dim, cfg.hidden_dim, out_dim, cfg.num_layers, cfg.dropout)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(pooled))


class FlatProjector(nn.Module):
    """LayerNorm then an MLP over the whole token sequence, flattened.

    Keeps where each token sits, which pooling throws away: with a small random CLIP, shape lives
    in the spatial pattern of the patch tokens, and only this adapter carried it into the shared
    space (on the synthetic set, flat tokens aligned first, then reached 84-96 % QA exact match,
    where pooled features stayed at 50-56 %). Sequences are zero-padded (or cut) to the train
    split's longest, `max_tokens`, so it suits fixed-length tokens (CLIP patches) best.
    """

    uses_tokens = True

    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.norm = nn.LayerNorm(in_dim * max_tokens)
        self.mlp = mlp(in_dim * max_tokens, cfg.hidden_dim, out_dim, cfg.num_layers, cfg.dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t < self.max_tokens:
            tokens = F.pad(tokens, (0, 0, 0, self.max_tokens - t))
        return self.mlp(self.norm(tokens[:, : self.max_tokens].flatten(1)))


class AttentionPool(nn.Module):
    """A learned query attends over the tokens (multi-head), then an MLP head."""

    uses_tokens = True

    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        width = cfg.hidden_dim
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, width)
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.attn = nn.MultiheadAttention(width, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.head = mlp(width, cfg.hidden_dim, out_dim, cfg.num_layers, cfg.dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.norm(tokens))
        q = self.query.expand(x.shape[0], -1, -1)
        pooled, _ = self.attn(q, x, x, key_padding_mask=~mask, need_weights=False)
        return self.head(pooled[:, 0])


class PerceiverLayer(nn.Module):
    """Cross-attention from latents to inputs, latent self-attention, feed-forward.

    Latents and inputs get separate LayerNorms (they live on different scales), and, as in
    Flamingo's resampler, the latents attend to [inputs; latents] so a latent can keep its own
    content when no input token fits.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_latents = nn.LayerNorm(width)
        self.norm_inputs = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))

    def forward(self, latents: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_inputs(inputs), q], dim=1)
        kv_pad = torch.cat([~mask, torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device)], dim=1)
        latents = latents + self.cross(q, kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        s = self.norm_self(latents)
        latents = latents + self.self_attn(s, s, s, need_weights=False)[0]
        return latents + self.ff(self.norm_ff(latents))


class PerceiverResampler(nn.Module):
    """Any number of input tokens -> `num_latents` latent tokens of width `width`."""

    def __init__(self, in_dim: int, width: int, num_latents: int, depth: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        # Small init: latents start near zero so the first cross-attention is driven by content,
        # and every latent starts distinct (a shared init would make them attend identically).
        self.latents = nn.Parameter(torch.randn(num_latents, width) * 0.02)
        self.layers = nn.ModuleList(PerceiverLayer(width, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(tokens)
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x, mask)
        return self.norm(latents)


class PerceiverAdapter(nn.Module):
    """Perceiver resampler over the tokens, mean over latents, MLP head."""

    uses_tokens = True

    def __init__(self, in_dim: int, out_dim: int, cfg: AdapterConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.resampler = PerceiverResampler(in_dim, cfg.hidden_dim, cfg.num_latents, cfg.depth, cfg.num_heads, cfg.dropout)
        self.head = mlp(cfg.hidden_dim, cfg.hidden_dim, out_dim, cfg.num_layers, cfg.dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.resample(tokens, mask).mean(dim=1))

    def resample(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The latents [B, num_latents, hidden_dim] before pooling: the instruct stage's token prefix."""
        return self.resampler(self.norm(tokens), mask)


ADAPTERS = {"mlp": MLPProjector, "flat": FlatProjector, "attn_pool": AttentionPool, "perceiver": PerceiverAdapter}


class ModalityAdapter(nn.Module):
    """Standardize, then the configured adapter; reads `pooled` or `tokens`+`mask` accordingly."""

    def __init__(self, cfg: AdapterConfig, token_stats: tuple[torch.Tensor, torch.Tensor],
                 pooled_stats: tuple[torch.Tensor, torch.Tensor], out_dim: int, max_tokens: int | None = None) -> None:
        """`max_tokens` (the train split's longest token sequence) is needed by the flat adapter only."""
        super().__init__()
        cls = ADAPTERS[cfg.kind]
        stats = token_stats if cls.uses_tokens else pooled_stats
        self.uses_tokens = cls.uses_tokens
        self.standardize = Standardize(*stats, enabled=cfg.standardize)
        if cls is FlatProjector:
            if not max_tokens:
                raise ValueError("the flat adapter needs max_tokens (the stored token sequences' length)")
            self.body = cls(stats[0].numel(), out_dim, cfg, max_tokens)
        else:
            self.body = cls(stats[0].numel(), out_dim, cfg)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.uses_tokens:
            return self.body(*self._tokens(features))
        return self.body(self._input(features["pooled"]))

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        # The store holds fp16. Standardise in fp32 (the statistics are fp32 buffers), then compute
        # in the adapter's parameter dtype: DeepSpeed's bf16 mode casts the parameters but the
        # batch arrives as stored, and a LayerNorm refuses mixed dtypes.
        return self.standardize(x.float()).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.body.parameters()).dtype

    def _tokens(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = features["mask"]
        # An int8/int4 store's codes are dequantised here, on the model's device: the loader and
        # the host-to-device copy move a half or a quarter of the float16 bytes.
        tokens = self._input(dequantize_features(features))
        # Padded positions are zero in the store but become -mean/std here; zero them again
        # so nothing downstream depends on what padding holds (attention masks them too).
        return tokens * mask.unsqueeze(-1), mask

    def resampled_tokens(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """A Perceiver adapter's latents [B, num_latents, hidden_dim] (what its head pools)."""
        if not isinstance(self.body, PerceiverAdapter):
            raise TypeError(f"resampled tokens need a perceiver adapter, this one is {type(self.body).__name__}")
        return self.body.resample(*self._tokens(features))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
