"""Compact token storage: int8 and int4 token sequences with their scales, and the way back.

A ViT-L/14-336 image is 576 x 1024 token values, 1.18 MB in float16: 12 TB for 10M images. The
tokens are quantised *after* a per-dimension z-score with fixed statistics (`center`, `spread`,
recorded in the manifest), because frozen-encoder features carry large per-dimension offsets
and a few outlier dimensions: scaled by the raw absolute maximum of a token, those few would
leave the other dimensions with a handful of levels each. After the z-score every dimension has
unit spread and one scale per token (int8) or per group of dimensions (int4) fits them all.

    int8   one signed byte per value, one float16 scale per token: x ~= center + spread * q * s
    int4   two values per byte (NF4 levels, the 16 quantiles of a unit normal that QLoRA uses,
           which suit z-scored values better than 16 even steps), one float16 scale per group
           of `int4_group(D)` dimensions of a token: x ~= center + spread * NF4[q] * s

The loader hands quantised tokens to the model as stored (1/2 or 1/4 of the bytes to gather and
to copy to the device); `dequantize` runs there, inside the adapters' input path. The same
functions quantise on the extraction device and in the store converter, so a converted store
and an extracted one hold the same bytes for the same features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TOKEN_DTYPES = ("float16", "float32", "int8", "int4")
QUANTIZED = ("int8", "int4")
INT4_GROUP = 64
"""Dimensions per int4 scale (fewer for a width it does not divide; see `int4_group`). Chosen
by measurement (BENCHMARKS.md, "Compact token store")."""


def int4_group(dim: int) -> int:
    """The int4 group size for tokens of width `dim`: INT4_GROUP, or the largest power of two
    below it that divides `dim` (tiny test models are 32 wide)."""
    group = INT4_GROUP
    while group > 2 and dim % group:
        group //= 2
    if dim % group or dim % 2:
        raise ValueError(f"int4 tokens need an even width, got {dim}")
    return group

# NF4: the 16 values of QLoRA's 4-bit NormalFloat (normalised quantiles of N(0, 1), with an exact
# zero), ascending. Stored codes index this table.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526489, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
# Decision boundaries between neighbouring NF4 levels (midpoints): code = number of boundaries below.
_NF4_BOUNDS = (NF4[1:] + NF4[:-1]) / 2


@dataclass(frozen=True)
class TokenLayout:
    """How one modality's tokens of width `dim` are stored under `dtype`."""

    dtype: str
    dim: int

    def __post_init__(self) -> None:
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"token dtype must be one of {TOKEN_DTYPES}, got {self.dtype!r}")
        if self.dtype == "int4":
            int4_group(self.dim)

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def stored_dtype(self) -> np.dtype:
        """numpy dtype of the stored token array."""
        return np.dtype({"float16": np.float16, "float32": np.float32, "int8": np.int8, "int4": np.uint8}[self.dtype])

    @property
    def stored_width(self) -> int:
        """Columns of the stored token array (int4 packs two values per byte)."""
        return self.dim // 2 if self.dtype == "int4" else self.dim

    @property
    def scale_width(self) -> int:
        """float16 scales per token (0 when not quantised)."""
        return {"int8": 1, "int4": self.dim // int4_group(self.dim)}.get(self.dtype, 0) if self.quantized else 0

    @property
    def bytes_per_token(self) -> int:
        return self.stored_width * self.stored_dtype.itemsize + 2 * self.scale_width


def floor_spread(std: torch.Tensor) -> torch.Tensor:
    """The per-dimension spread used to z-score: the std, floored (a dimension that never varies
    would divide by ~0); the same floor as the adapters' standardisation."""
    std = std.float()
    return torch.clamp(std, min=float(torch.clamp(std.mean() * 1e-3, min=1e-6)))


def zscore_record(mean: np.ndarray, std: np.ndarray) -> dict:
    """The manifest's record of one modality's z-score: `center` (the mean) and `spread` (the
    floored std), as float32 values in JSON."""
    spread = floor_spread(torch.as_tensor(np.asarray(std, dtype=np.float32)))
    return {"center": [float(v) for v in np.asarray(mean, dtype=np.float32)], "spread": [float(v) for v in spread]}


@torch.no_grad()
def quantize(x: torch.Tensor, center: torch.Tensor, spread: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows [N, D] (any float dtype, any device) -> (codes, float16 scales [N, G]).

    `center` and `spread` are [D] (the manifest's); computed in float32 on x's device."""
    if dtype not in QUANTIZED:
        raise ValueError(f"quantize: {dtype!r} is not a quantised dtype")
    z = (x.float() - center.to(x.device, torch.float32)) / spread.to(x.device, torch.float32)
    n, d = z.shape
    if dtype == "int8":
        scale = (z.abs().amax(dim=1, keepdim=True) / 127).to(torch.float16)
        # Divide by the float16 scale the reader will multiply with (subnormal ones included),
        # so the pair is consistent; an all-zero row has scale 0 and codes 0.
        s = _divisor(scale)
        codes = torch.round(z / s).clamp(-127, 127).to(torch.int8)
        return codes, scale
    group = int4_group(d)
    groups = z.reshape(n, d // group, group)
    scale = groups.abs().amax(dim=2).to(torch.float16)  # [N, G]
    s = _divisor(scale)
    unit = (groups / s[..., None]).clamp(-1, 1).reshape(n, d)
    codes = torch.bucketize(unit, _NF4_BOUNDS.to(z.device)).to(torch.uint8)  # 0..15
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scale


FLOAT_DTYPE = {"float16": torch.float16, "float32": torch.float32}


def store_rows(rows: torch.Tensor, token_dtype: str, zscore: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Token rows [N, D] (any float dtype, any device) as a store of `token_dtype` holds them:
    (stored rows, float16 scales or None, reference). The reference is the float16 (float32 for
    a float32 store) rows; a quantised store codes it, and the manifest's statistics are its
    statistics, so a quantised store and a float16 store of the same features agree on them.
    Extraction and the converter both store through here: same features, same bytes."""
    reference = rows.to(FLOAT_DTYPE.get(token_dtype, torch.float16))
    if token_dtype in QUANTIZED:
        codes, scales = quantize(reference, *zscore, token_dtype)
        return codes, scales, reference
    return reference, None, reference


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """The float16 scales as float32 divisors, 1 where a scale is 0 (its values are all 0)."""
    s = scale.float()
    return torch.where(s == 0, torch.ones_like(s), s)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, center: torch.Tensor, spread: torch.Tensor,
               dtype: str) -> torch.Tensor:
    """Stored codes [..., W] and scales [..., G] -> float32 tokens [..., D], on codes' device."""
    center = center.to(codes.device, torch.float32)
    spread = spread.to(codes.device, torch.float32)
    if dtype == "int8":
        z = codes.float() * scales.float()
    elif dtype == "int4":
        lo = (codes & 0xF).long()
        hi = (codes >> 4).long()
        idx = torch.stack([lo, hi], dim=-1).flatten(-2)  # [..., D], even dims from the low nibble
        unit = _nf4_on(codes.device)[idx]
        shape = unit.shape
        z = (unit.reshape(*shape[:-1], scales.shape[-1], -1) * scales.float()[..., None]).reshape(shape)
    else:
        raise ValueError(f"dequantize: {dtype!r} is not a quantised dtype")
    return z * spread + center


_NF4_CACHE: dict[torch.device, torch.Tensor] = {}


def _nf4_on(device: torch.device) -> torch.Tensor:
    """The NF4 table on `device`, copied there once (not on every batch)."""
    if device not in _NF4_CACHE:
        _NF4_CACHE[device] = NF4.to(device)
    return _NF4_CACHE[device]


def dequantize_features(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 tokens of one modality of a loader batch, dequantised when the batch says so.

    A quantised batch carries `scales` [B, T, G], the store's per-dimension `center` and
    `spread` [D], and `quant`, the scheme's name (a string, so reading it never waits for the
    device)."""
    tokens = features["tokens"]
    if "scales" not in features:
        return tokens.float()
    return dequantize(tokens, features["scales"], features["center"], features["spread"], features["quant"])
