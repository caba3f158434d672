"""Adapters (edge_glass/models/adapters.py): shapes, mask handling, standardisation, gradients.

Every adapter is built the way AlignmentModel builds it, through `ModalityAdapter(cfg,
token_stats, pooled_stats, out_dim)`, and fed FeatureLoader-shaped features: `tokens` [B, T, E]
fp16, `mask` [B, T] bool (True = real token), `pooled` [B, P] fp16. Token and pooled widths
differ (E=12, P=10) so an adapter that reads the wrong field or the wrong statistics fails.
"""

from __future__ import annotations

import pytest
import torch

from edge_glass.config import AdapterConfig
from edge_glass.models.adapters import ModalityAdapter, Standardize

E, P = 12, 10  # token width, pooled width
KINDS = ["mlp", "attn_pool", "perceiver"]
TOKEN_KINDS = ["attn_pool", "perceiver"]


def adapter_cfg(kind: str, standardize: bool = True) -> AdapterConfig:
    extra = {}
    if kind in TOKEN_KINDS:
        extra["num_heads"] = 4
    if kind == "perceiver":
        extra.update(num_latents=4, depth=2)
    return AdapterConfig(kind, hidden_dim=32, num_layers=2, standardize=standardize, **extra)


def stats(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    token = (torch.randn(E, generator=g), torch.rand(E, generator=g) + 0.5)
    pooled = (torch.randn(P, generator=g), torch.rand(P, generator=g) + 0.5)
    return token, pooled


def make_adapter(kind: str, out_dim: int = 16, standardize: bool = True, seed: int = 0) -> ModalityAdapter:
    torch.manual_seed(seed)
    token, pooled = stats(seed)
    return ModalityAdapter(adapter_cfg(kind, standardize), token, pooled, out_dim)


def features(lengths: list[int], T: int | None = None, seed: int = 1, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Loader-style features: zero padding after each sample's length."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    B = len(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    tokens = torch.randn(B, T, E, generator=g) * mask.unsqueeze(-1)
    pooled = torch.randn(B, P, generator=g)
    return {"tokens": tokens.to(dtype), "mask": mask, "pooled": pooled.to(dtype)}


# --- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,T,D", [(1, 1, 8), (3, 5, 16), (7, 2, 24)])
def test_output_shape(kind: str, B: int, T: int, D: int) -> None:
    adapter = make_adapter(kind, out_dim=D)
    lengths = [max(1, T - i % T) for i in range(B)]
    out = adapter(features(lengths, T=T))
    assert out.shape == (B, D)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_token_kinds_read_tokens_and_mlp_reads_pooled() -> None:
    base = features([3, 5, 1])
    tokens_changed = dict(base, tokens=(base["tokens"].float() + 1.0).to(torch.float16))
    pooled_changed = dict(base, pooled=(base["pooled"].float() + 1.0).to(torch.float16))
    with torch.no_grad():
        mlp = make_adapter("mlp")
        assert not mlp.uses_tokens
        assert torch.equal(mlp(base), mlp(tokens_changed))
        assert not torch.allclose(mlp(base), mlp(pooled_changed))
        for kind in TOKEN_KINDS:
            a = make_adapter(kind)
            assert a.uses_tokens
            assert torch.equal(a(base), a(pooled_changed))
            assert not torch.allclose(a(base), a(tokens_changed))


# --- the mask ----------------------------------------------------------------------------------


LENGTHS = [1, 4, 6, 2, 1, 5]


@pytest.mark.parametrize("kind", TOKEN_KINDS)
@pytest.mark.parametrize("train_mode", [True, False])
def test_padded_values_do_not_matter(kind: str, train_mode: bool) -> None:
    adapter = make_adapter(kind).train(train_mode)
    base = features(LENGTHS)
    g = torch.Generator().manual_seed(7)
    junk = (torch.randn(base["tokens"].shape, generator=g) * 1000.0).to(torch.float16)
    noisy = dict(base, tokens=torch.where(base["mask"].unsqueeze(-1), base["tokens"], junk))
    assert not torch.equal(noisy["tokens"], base["tokens"])  # the padding really changed
    with torch.no_grad():
        a, b = adapter(base), adapter(noisy)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_padding_width_does_not_matter(kind: str) -> None:
    """A sample's embedding must not depend on how far its batch was padded (batch composition)."""
    adapter = make_adapter(kind).eval()
    tight = features(LENGTHS)
    extra = 5  # the same real tokens, five more zero-padded positions (as a longer batch mate would cause)
    wide = dict(
        tight,
        tokens=torch.cat([tight["tokens"], torch.zeros(len(LENGTHS), extra, E, dtype=torch.float16)], dim=1),
        mask=torch.cat([tight["mask"], torch.zeros(len(LENGTHS), extra, dtype=torch.bool)], dim=1),
    )
    with torch.no_grad():
        torch.testing.assert_close(adapter(wide), adapter(tight), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_output_depends_on_every_real_token(kind: str) -> None:
    adapter = make_adapter(kind).eval()
    base = features(LENGTHS)
    with torch.no_grad():
        ref = adapter(base)
        for i, n in enumerate(LENGTHS):
            for t in {0, n - 1}:  # the first and the last real token
                tokens = base["tokens"].clone()
                tokens[i, t] += 1.0
                out = adapter(dict(base, tokens=tokens))
                assert (out[i] - ref[i]).abs().max() > 1e-4, f"sample {i} ignores its token {t}"
                others = [j for j in range(len(LENGTHS)) if j != i]
                torch.testing.assert_close(out[others], ref[others], rtol=0, atol=1e-6)


# --- standardisation ---------------------------------------------------------------------------


def _body_input(adapter: ModalityAdapter, feats: dict) -> torch.Tensor:
    seen = []
    handle = adapter.body.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            adapter(feats)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", KINDS)
def test_standardize_uses_the_given_statistics(kind: str) -> None:
    adapter = make_adapter(kind)
    (tm, ts), (pm, ps) = stats(0)
    lengths = [3, 1]
    mask = torch.arange(3)[None, :] < torch.tensor(lengths)[:, None]
    # fp32 inputs exactly equal to the mean: the body must see exact zeros
    at_mean = {"tokens": tm.expand(2, 3, E).clone(), "mask": mask, "pooled": pm.expand(2, P).clone()}
    seen = _body_input(adapter, at_mean)
    assert torch.equal(seen, torch.zeros_like(seen))

    g = torch.Generator().manual_seed(3)
    x = {"tokens": torch.randn(2, 3, E, generator=g) * mask.unsqueeze(-1), "mask": mask, "pooled": torch.randn(2, P, generator=g)}
    seen = _body_input(adapter, x)
    if adapter.uses_tokens:
        want = (x["tokens"] - tm) / ts * mask.unsqueeze(-1)  # padding is zero after standardising too
    else:
        want = (x["pooled"] - pm) / ps
    torch.testing.assert_close(seen, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_standardize_false_passes_inputs_through(kind: str) -> None:
    adapter = make_adapter(kind, standardize=False)
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = {"tokens": torch.randn(2, 3, E, generator=g) * mask.unsqueeze(-1), "mask": mask, "pooled": torch.randn(2, P, generator=g)}
    seen = _body_input(adapter, x)
    assert torch.equal(seen, x["tokens"] if adapter.uses_tokens else x["pooled"])
    # and the two settings really differ on the same input
    assert not torch.allclose(_body_input(make_adapter(kind, standardize=True), x), seen)


def test_standardize_module() -> None:
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.0])
    s = Standardize(mean, std)
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 1.5]])
    torch.testing.assert_close(s(x), torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 1.0]]))
    assert [n for n, _ in s.named_parameters()] == []  # fixed statistics, not trained
    assert {n for n, _ in s.named_buffers()} == {"mean", "std"}
    off = Standardize(mean, std, enabled=False)
    x = torch.randn(4, 3)
    assert torch.equal(off(x), x)
    # a constant dimension (std 0) must not blow up
    flat = Standardize(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isfinite(flat(torch.randn(5, 3))).all()


# --- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_trainable_parameter(kind: str) -> None:
    adapter = make_adapter(kind).train()
    out = adapter(features(LENGTHS))
    g = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    params = [(n, p) for n, p in adapter.named_parameters() if p.requires_grad]
    assert params
    missing = [n for n, p in params if p.grad is None]
    assert missing == [], f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    zero = [n for n, p in params if not p.grad.any()]
    assert zero == [], f"gradient identically zero for {zero}"


# --- perceiver ---------------------------------------------------------------------------------


def test_perceiver_latents_distinct_at_init() -> None:
    adapter = make_adapter("perceiver")
    latents = adapter.body.resampler.latents.detach()
    assert latents.shape == (4, 32)
    d = torch.cdist(latents, latents)
    off_diag = d[~torch.eye(len(latents), dtype=torch.bool)]
    assert off_diag.min() > 1e-3
    # and they stay distinct after resampling a real input
    with torch.no_grad():
        tokens = adapter.body.norm(features([5])["tokens"].float())
        resampled = adapter.body.resampler(tokens, torch.ones(1, 5, dtype=torch.bool))[0]
    d = torch.cdist(resampled, resampled)
    assert d[~torch.eye(len(resampled), dtype=torch.bool)].min() > 1e-3
