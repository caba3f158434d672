"""Compact token storage (`edge_glass.features.quantize`).

What is tested:
- int8 and int4 round trips (`quantize` then `dequantize`) on synthetic features shaped like a
  frozen encoder's: per-dimension offsets and spreads that differ by ~100x, a few outlier
  dimensions, heavy (student-t) tails, z-scored with the data's own statistics. The mean
  per-token relative error must stay under 1% (int8) and 10% (int4), and the z-score must
  matter: quantising the raw values per token is clearly worse.
- `store_rows`: what a store of each token dtype holds (shapes, dtypes, the reference rows).
- `int4_group`: the group size for a width, and the odd-width error.
- NF4 packing: even dimensions in the low nibble, exact round trip of values on the NF4 levels,
  an all-centre row round-trips to the centre without NaN from its zero scale.
- `dequantize_features` on loader-style batch dicts (float and quantised).
- `TokenLayout.bytes_per_token` and the resulting int4 saving.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_glass.features.quantize import (
    NF4,
    TokenLayout,
    dequantize,
    dequantize_features,
    floor_spread,
    int4_group,
    quantize,
    store_rows,
)


def encoder_like_features(n: int = 512, d: int = 256, seed: int = 0) -> torch.Tensor:
    """[n, d] float32 rows with the statistics that motivate the z-score: offsets up to ~+-5 and
    spreads from 0.05 to 5 per dimension, four outlier dimensions with offsets of 40-80 and
    10x the spread, student-t (df=4) tails."""
    g = np.random.default_rng(seed)
    offset = g.uniform(-5, 5, d)
    spread = np.exp(g.uniform(np.log(0.05), np.log(5), d))
    outliers = g.choice(d, 4, replace=False)
    offset[outliers] = g.choice([-1, 1], 4) * g.uniform(40, 80, 4)
    spread[outliers] *= 10
    x = offset + spread * g.standard_t(4, size=(n, d))
    return torch.tensor(x, dtype=torch.float32)


def own_zscore(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The data's own per-dimension (center, spread), as the manifest records them."""
    return x.mean(dim=0), floor_spread(x.std(dim=0))


def mean_relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over tokens of ||x_hat - x|| / ||x||."""
    return float(((x_hat - x).norm(dim=1) / x.norm(dim=1)).mean())


def round_trip(x: torch.Tensor, center: torch.Tensor, spread: torch.Tensor, dtype: str) -> torch.Tensor:
    codes, scales = quantize(x, center, spread, dtype)
    return dequantize(codes, scales, center, spread, dtype)


# --- round trips on encoder-like features ---------------------------------------------------


def test_the_synthetic_features_have_the_spread_and_offset_ranges_the_z_score_is_for():
    """Guard on the test data itself: the per-dimension spreads differ by well over 5x (towards
    100x) and a few dimensions sit far from the rest."""
    x = encoder_like_features()
    center, spread = own_zscore(x)
    assert float(spread.max() / spread.min()) > 50
    assert float(center.abs().max()) > 10 * float(center.abs().median())


@pytest.mark.parametrize(("dtype", "bound"), [("int8", 0.01), ("int4", 0.10)])
def test_round_trip_error_of_z_scored_encoder_like_features_is_small(dtype, bound):
    x = encoder_like_features(seed=1)
    center, spread = own_zscore(x)
    x_hat = round_trip(x, center, spread, dtype)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert torch.isfinite(x_hat).all()
    error = mean_relative_error(x_hat, x)
    assert 0 < error < bound, f"{dtype}: mean relative error {error:.4%} (bound {bound:.0%})"


def test_int4_loses_more_than_int8_on_the_same_features():
    x = encoder_like_features(seed=2)
    center, spread = own_zscore(x)
    e8 = mean_relative_error(round_trip(x, center, spread, "int8"), x)
    e4 = mean_relative_error(round_trip(x, center, spread, "int4"), x)
    assert e4 > 2 * e8


def test_z_scoring_before_int8_beats_quantising_the_raw_values():
    """With center 0 and spread 1 the per-token scale is set by the outlier dimensions and the
    narrow dimensions get a handful of levels; the data's own statistics fix that."""
    x = encoder_like_features(seed=3)
    center, spread = own_zscore(x)
    with_stats = mean_relative_error(round_trip(x, center, spread, "int8"), x)
    raw = mean_relative_error(round_trip(x, torch.zeros_like(center), torch.ones_like(spread), "int8"), x)
    assert raw > 3 * with_stats, f"raw {raw:.4%} vs z-scored {with_stats:.4%}"

    # Per dimension, measured against the dimension's own spread: the narrowest dimensions are
    # where raw quantisation hurts.
    narrow = spread < spread.median() / 4
    assert narrow.sum() >= 10
    x_raw = round_trip(x, torch.zeros_like(center), torch.ones_like(spread), "int8")
    x_z = round_trip(x, center, spread, "int8")
    raw_narrow = ((x_raw - x)[:, narrow].pow(2).mean(0).sqrt() / spread[narrow]).mean()
    z_narrow = ((x_z - x)[:, narrow].pow(2).mean(0).sqrt() / spread[narrow]).mean()
    assert raw_narrow > 20 * z_narrow


def test_int8_codes_use_the_full_range_per_token():
    """Each token's largest |z| maps to +-127 (the scale is the token's absmax / 127)."""
    x = encoder_like_features(n=64, seed=4)
    center, spread = own_zscore(x)
    codes, scales = quantize(x, center, spread, "int8")
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert (codes.abs().amax(dim=1) >= 126).all()
    z = (x - center) / spread
    torch.testing.assert_close(scales.float().squeeze(1), z.abs().amax(dim=1) / 127, rtol=1e-3, atol=0)


def test_quantize_rejects_a_float_dtype():
    x = encoder_like_features(n=4, d=64)
    with pytest.raises(ValueError, match="float16"):
        quantize(x, *own_zscore(x), "float16")


# --- store_rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("token_dtype", ["float16", "float32"])
def test_store_rows_of_a_float_store_is_the_cast_rows_without_scales(token_dtype):
    x = encoder_like_features(n=16, d=128)
    rows, scales, reference = store_rows(x, token_dtype, None)
    want = getattr(torch, token_dtype)
    assert scales is None
    assert rows.dtype == want and reference.dtype == want
    assert rows.shape == (16, 128)
    assert torch.equal(reference, x.to(want))
    assert torch.equal(rows, reference)


@pytest.mark.parametrize(
    ("token_dtype", "codes_dtype", "width", "groups"),
    [("int8", torch.int8, 128, 1), ("int4", torch.uint8, 64, 128 // 64)],
)
def test_store_rows_of_a_quantised_store_codes_the_float16_reference(token_dtype, codes_dtype, width, groups):
    # Values that float16 rounds: the codes must be those of the float16 rows, so a quantised
    # store and a float16 store of the same features agree.
    x = encoder_like_features(n=16, d=128) + 1e-3 * torch.rand(16, 128, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x.half().float(), x)
    zscore = own_zscore(x)
    codes, scales, reference = store_rows(x, token_dtype, zscore)
    assert codes.dtype == codes_dtype and codes.shape == (16, width)
    assert scales.dtype == torch.float16 and scales.shape == (16, groups)
    assert reference.dtype == torch.float16 and torch.equal(reference, x.half())
    want_codes, want_scales = quantize(x.half(), *zscore, token_dtype)
    assert torch.equal(codes, want_codes)
    assert torch.equal(scales, want_scales)


def test_store_rows_int4_scales_follow_int4_group_for_a_narrow_width():
    x = encoder_like_features(n=8, d=96)  # 96 is not a multiple of 64: groups of 32
    codes, scales, _ = store_rows(x, "int4", own_zscore(x))
    assert codes.shape == (8, 48)
    assert scales.shape == (8, 96 // int4_group(96)) == (8, 3)


# --- int4_group -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 128, 1024, 4096])
def test_int4_group_is_64_for_widths_divisible_by_64(dim):
    assert int4_group(dim) == 64


@pytest.mark.parametrize(("dim", "group"), [(32, 32), (96, 32), (48, 16), (6, 2)])
def test_int4_group_is_the_largest_power_of_two_up_to_64_dividing_the_width(dim, group):
    assert int4_group(dim) == group
    assert dim % group == 0


@pytest.mark.parametrize("dim", [33, 1023, 1])
def test_int4_group_rejects_an_odd_width(dim):
    with pytest.raises(ValueError, match="even width"):
        int4_group(dim)
    with pytest.raises(ValueError):
        TokenLayout("int4", dim)


# --- NF4 packing ------------------------------------------------------------------------------


def nf4_rows(idx: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows whose values are NF4[idx] * scale (center 0, spread 1)."""
    return NF4[idx] * scale


def level_indices(n: int, d: int, seed: int) -> torch.Tensor:
    """Random NF4 level indices [n, d] with level 15 (+1.0) in every group of 32, so each
    group's absmax, and therefore its scale, is exactly `scale`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 16, (n, d), generator=g)
    idx[:, ::32] = 15
    return idx


@pytest.mark.parametrize("scale", [2.0, 0.375, 3.5])
def test_values_on_the_nf4_levels_round_trip_exactly(scale):
    d = 128
    idx = level_indices(8, d, seed=int(scale * 8))
    x = nf4_rows(idx, scale)
    center, spread = torch.zeros(d), torch.ones(d)
    codes, scales = quantize(x, center, spread, "int4")
    assert torch.all(scales == scale)
    x_hat = dequantize(codes, scales, center, spread, "int4")
    assert torch.equal(x_hat, x)


def test_int4_packs_even_dimensions_in_the_low_nibble():
    d = 64
    idx = level_indices(4, d, seed=7)
    codes, _ = quantize(nf4_rows(idx, 1.0), torch.zeros(d), torch.ones(d), "int4")
    assert codes.dtype == torch.uint8 and codes.shape == (4, d // 2)
    assert torch.equal((codes & 0xF).long(), idx[:, 0::2])
    assert torch.equal((codes >> 4).long(), idx[:, 1::2])


def test_int4_codes_are_the_nearest_nf4_level():
    x = encoder_like_features(n=32, d=128, seed=5)
    center, spread = own_zscore(x)
    codes, scales = quantize(x, center, spread, "int4")
    unit = (((x - center) / spread).reshape(32, 2, 64) / scales.float()[..., None]).reshape(32, 128)
    nearest = (unit[..., None] - NF4).abs().argmin(dim=-1)
    stored = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2).long()
    # Ties are impossible in practice with continuous data; allow none.
    assert torch.equal(stored, nearest)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_row_at_the_center_round_trips_to_the_center_without_nan(dtype):
    x = encoder_like_features(n=6, d=128, seed=6)
    center, spread = own_zscore(x)
    x[2] = center
    codes, scales = quantize(x, center, spread, dtype)
    assert torch.all(scales[2] == 0)
    # The stored codes are those of zero (NF4 has an exact zero level), not of a 0/0.
    if dtype == "int8":
        assert torch.all(codes[2] == 0)
    else:
        zero = int((NF4 == 0).nonzero())
        assert torch.all(codes[2] & 0xF == zero) and torch.all(codes[2] >> 4 == zero)
    x_hat = dequantize(codes, scales, center, spread, dtype)
    assert torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[2], center)


# --- dequantize_features ----------------------------------------------------------------------


def test_dequantize_features_passes_float_tokens_through_as_float32():
    tokens = encoder_like_features(n=2 * 5, d=64).reshape(2, 5, 64).half()
    out = dequantize_features({"tokens": tokens, "mask": torch.ones(2, 5, dtype=torch.bool)})
    assert out.dtype == torch.float32 and out.shape == (2, 5, 64)
    assert torch.equal(out, tokens.float())


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_dequantize_features_of_a_quantised_batch_equals_dequantize_of_its_rows(dtype):
    b, t, d = 3, 7, 128
    x = encoder_like_features(n=b * t, d=d, seed=8)
    center, spread = own_zscore(x)
    codes, scales = quantize(x, center, spread, dtype)
    batch = {
        "tokens": codes.reshape(b, t, -1),
        "scales": scales.reshape(b, t, -1),
        "center": center,
        "spread": spread,
        "quant": dtype,
    }
    assert batch["tokens"].shape == (b, t, d if dtype == "int8" else d // 2)
    out = dequantize_features(batch)
    assert out.dtype == torch.float32 and out.shape == (b, t, d)
    assert torch.equal(out, dequantize(codes, scales, center, spread, dtype).reshape(b, t, d))
    assert mean_relative_error(out.reshape(b * t, d), x) < 0.1


# --- TokenLayout ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("int8", 1024 + 2), ("int4", 512 + 2 * 16), ("float16", 2048), ("float32", 4096)],
)
def test_bytes_per_token_at_width_1024(dtype, expected):
    assert TokenLayout(dtype, 1024).bytes_per_token == expected


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8", "int4"])
def test_bytes_per_token_matches_what_store_rows_returns(dtype):
    d = 1024
    x = encoder_like_features(n=4, d=d, seed=9)
    rows, scales, _ = store_rows(x, dtype, own_zscore(x))
    layout = TokenLayout(dtype, d)
    stored = rows[0].numel() * rows.element_size() + (0 if scales is None else scales[0].numel() * scales.element_size())
    assert stored == layout.bytes_per_token
    assert rows.shape[1] == layout.stored_width
    assert rows.numpy().dtype == layout.stored_dtype
    assert (0 if scales is None else scales.shape[1]) == layout.scale_width


def test_int4_is_at_least_3_7_times_smaller_than_float16_at_width_1024():
    ratio = TokenLayout("float16", 1024).bytes_per_token / TokenLayout("int4", 1024).bytes_per_token
    assert ratio >= 3.7


def test_token_layout_rejects_an_unknown_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        TokenLayout("bfloat16", 1024)
