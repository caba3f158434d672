"""Connector: aligned features -> decoder-width prefix tokens."""

from __future__ import annotations

import pytest
import torch

from edge_glass.models.connector import Connector


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_pooled_makes_num_tokens_distinct_soft_tokens(kind):
    torch.manual_seed(0)
    conn = Connector(32, 48, 4, kind, "pooled")
    x = torch.randn(5, 32)
    out = conn(x)
    assert out.shape == (5, 4, 48)
    # The N tokens are different maps of the same vector, not one token repeated.
    assert not torch.allclose(out[:, 0], out[:, 1])
    # Row i depends on sample i only.
    x2 = x.clone()
    x2[3] += 1.0
    out2 = conn(x2)
    assert torch.equal(out2[:3], out[:3]) and not torch.allclose(out2[3], out[3])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_tokens_are_mapped_one_by_one_and_masked_tokens_give_zeros(kind):
    torch.manual_seed(0)
    conn = Connector(16, 24, 6, kind, "tokens")
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = conn(x, mask)
    assert out.shape == (2, 6, 24)
    assert (out[0, 4:] == 0).all() and (out[0, :4] != 0).any()
    # Per-token: token j's output is the map of token j alone.
    assert torch.allclose(conn(x[:, 2:3].expand(2, 6, 16))[:, 0], out[:, 2], atol=1e-6)
    # Values at masked positions never reach the output (even NaN).
    x2 = x.clone()
    x2[0, 4:] = float("nan")
    assert torch.equal(conn(x2, mask), out)
    # Without a mask every token is mapped.
    assert (conn(x)[0, 4:] != 0).any()


def test_kind_linear_is_a_single_affine_map():
    conn = Connector(8, 4, 3, "linear", "pooled", norm=False)
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    # Affine: f(x) + f(y) - f(0) == f(x + y).
    lhs = conn(x) + conn(y) - conn(torch.zeros(2, 8))
    assert torch.allclose(lhs, conn(x + y), atol=1e-5)
    mlp = Connector(8, 4, 3, "mlp", "pooled", norm=False)
    assert not torch.allclose(mlp(x) + mlp(y) - mlp(torch.zeros(2, 8)), mlp(x + y), atol=1e-3)


def test_bad_shapes_and_options_raise():
    with pytest.raises(ValueError, match="kind"):
        Connector(8, 4, 2, "conv", "pooled")
    with pytest.raises(ValueError, match="input"):
        Connector(8, 4, 2, "mlp", "patches")
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        Connector(8, 4, 2, "mlp", "pooled")(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"\[B, 2, 8\]"):
        Connector(8, 4, 2, "mlp", "tokens")(torch.randn(2, 3, 8))
