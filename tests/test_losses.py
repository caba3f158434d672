"""Contrastive loss pieces (edge_glass/models/losses.py): InfoNCE, caption masking, logit scale, MRL.

All in one process (no process group), where each rank's rows are the whole batch; the
two-rank equivalence lives in test_alignment_learning.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edge_glass.models.losses import LogitScale, info_nce, mrl_prefixes


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def loss(a, b, scale, group_ids=None, label_smoothing=0.0) -> torch.Tensor:
    s = torch.as_tensor(float(scale))
    return info_nce(a, b, s, a, b, group_ids, group_ids, label_smoothing)


def reference_info_nce(a, b, scale, group_ids=None, label_smoothing=0.0) -> torch.Tensor:
    """Row by row: row i's softmax runs over its positive and the keys of *other* captions only."""
    n = a.shape[0]
    terms = []
    for q, k in ((a, b), (b, a)):
        for i in range(n):
            keep = [j for j in range(n) if j == i or group_ids is None or group_ids[j] != group_ids[i]]
            logits = scale * q[i] @ k[keep].T
            target = torch.tensor(keep.index(i))
            terms.append(F.cross_entropy(logits[None], target[None], label_smoothing=label_smoothing))
    return 0.5 * (torch.stack(terms[:n]).mean() + torch.stack(terms[n:]).mean())


# --- InfoNCE values ----------------------------------------------------------------------------


@pytest.mark.parametrize("B", [8, 64])
def test_random_embeddings_at_scale_one_give_ln_batch(B: int) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = unit(torch.randn(B, 2048, generator=g)), unit(torch.randn(B, 2048, generator=g))
    assert abs(float(loss(a, b, 1.0)) - math.log(B)) < 0.03


def test_identical_orthogonal_embeddings_at_high_scale_give_zero() -> None:
    a = torch.eye(16)[:10]  # one-hot rows: orthonormal
    value = float(loss(a, a.clone(), 100.0))
    assert 0.0 <= value < 1e-6


def test_matches_reference_and_is_symmetric() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    torch.testing.assert_close(loss(a, b, 7.0), reference_info_nce(a, b, 7.0))
    torch.testing.assert_close(loss(a, b, 7.0), loss(b, a, 7.0))
    # the positive is the same row: shuffling b's rows against a's must change the loss
    assert float(loss(a, b[torch.tensor([1, 0, 2, 3, 4, 5])], 7.0)) != pytest.approx(float(loss(a, b, 7.0)))


# --- same-caption masking ----------------------------------------------------------------------


def _two_renders_of_one_caption() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows 1 and 3 are two samples with the same caption: the same text embedding and nearly
    the same image embedding. Without masking each is a strong negative of the other."""
    eye = torch.eye(8)
    a = eye[:5].clone()
    b = eye[:5].clone()
    a[3] = unit(eye[1] + 0.05 * eye[6])
    b[3] = b[1]
    return a, b, torch.tensor([10, 11, 12, 11, 14])


def test_same_caption_rows_are_not_negatives() -> None:
    a, b, ids = _two_renders_of_one_caption()
    masked = loss(a, b, 20.0, ids)
    unmasked = loss(a, b, 20.0)
    torch.testing.assert_close(masked, reference_info_nce(a, b, 20.0, ids))
    assert float(masked) < 0.01
    assert float(unmasked) > float(masked) + 0.2  # ~ 2/5 * ln 2: the masking is what removes it
    # distinct ids: masking is a no-op
    torch.testing.assert_close(loss(a, b, 20.0, torch.arange(5)), unmasked)


def test_same_caption_masking_with_random_embeddings() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = unit(torch.randn(7, 5, generator=g)), unit(torch.randn(7, 5, generator=g))
    ids = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    torch.testing.assert_close(loss(a, b, 5.0, ids), reference_info_nce(a, b, 5.0, ids))


def test_label_smoothing_with_same_caption_rows_is_finite() -> None:
    """LossConfig.label_smoothing > 0 together with any repeated caption in a batch."""
    a, b, ids = _two_renders_of_one_caption()
    value = loss(a, b, 20.0, ids, label_smoothing=0.1)
    assert torch.isfinite(value), f"label smoothing over masked (-inf) logits gives {float(value)}"
    torch.testing.assert_close(value, reference_info_nce(a, b, 20.0, ids, label_smoothing=0.1))


def test_label_smoothing_without_repeats() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    torch.testing.assert_close(loss(a, b, 5.0, torch.arange(6), 0.1), reference_info_nce(a, b, 5.0, None, 0.1))


# --- logit scale -------------------------------------------------------------------------------


def test_logit_scale_init() -> None:
    s = LogitScale(0.07, 100.0)
    assert float(s().detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert s.value.requires_grad
    assert not LogitScale(0.07, 100.0, learnable=False).value.requires_grad


def test_logit_scale_clamped_with_zero_gradient_above_max() -> None:
    s = LogitScale(0.07, 100.0)
    s.value.data.fill_(10.0)  # exp(10) ~ 22026 if unclamped
    out = s()
    # exp(float32(ln 100)) rounds to 100.0000076: allow that one ulp, nothing more
    assert float(out.detach()) <= 100.0 * (1 + 1e-6)
    assert float(out.detach()) == pytest.approx(100.0, rel=1e-6)
    out.backward()
    assert s.value.grad is not None and float(s.value.grad) == 0.0


def test_logit_scale_gradient_flows_below_max() -> None:
    s = LogitScale(0.07, 100.0)
    s().backward()
    assert float(s.value.grad) == pytest.approx(1 / 0.07, rel=1e-5)  # d exp(v) / dv = exp(v)


# --- Matryoshka prefixes -----------------------------------------------------------------------


def test_mrl_prefixes() -> None:
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(5, 32, generator=g) * 3).to(torch.float16)
    out = mrl_prefixes(x, [8, 16, 32])
    assert list(out) == [8, 16, 32]
    for d, p in out.items():
        assert p.shape == (5, d) and p.dtype == torch.float32
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(5))
        # the direction of the first d coordinates, not of some other slice
        torch.testing.assert_close(p, unit(x[:, :d].float()))
    assert not torch.allclose(out[8], out[32][:, :8])  # each prefix is normalised on its own


def test_mrl_prefix_gradient_only_reaches_its_coordinates() -> None:
    x = torch.randn(3, 16, requires_grad=True)
    mrl_prefixes(x, [4])[4].sum().backward()
    assert x.grad[:, 4:].abs().max() == 0
    assert x.grad[:, :4].abs().max() > 0


# --- AlignmentModel's total loss ---------------------------------------------------------------


def test_model_loss_is_the_weighted_sum_of_pair_and_dim_terms() -> None:
    """Loss and gradients of AlignmentModel.forward equal an independent sum over its pairs and
    MRL dims of reference InfoNCE terms (same-caption rows masked), weighted by pair and dim."""
    from helpers.align_two_ranks import build_model, global_batch

    from edge_glass.models.alignment import caption_ids

    weights = [0.5, 0.25, 2.0]
    model = build_model(mrl_weights=weights)
    batch = global_batch()
    assert model.dims == [4, 8, 16]
    params = [p for p in model.parameters() if p.requires_grad]
    total, parts, _ = model(batch)
    got = torch.autograd.grad(total, params, allow_unused=True)

    emb = model.embed(batch)
    ids = caption_ids(batch["captions"], torch.device("cpu"))
    scale = model.logit_scale()
    pair_weights = {"vision_text": 1.0, "audio_text": 0.5, "vision_audio": 0.25, "fused_text": 0.75}
    assert model.pairs == pair_weights
    ref = torch.zeros(())
    for pair, w in pair_weights.items():
        a, b = pair.split("_")
        for d, wd in zip([4, 8, 16], weights):
            term = reference_info_nce(unit(emb[a][:, :d]), unit(emb[b][:, :d]), scale, ids)
            assert float(parts[f"loss/{pair}@{d}"]) == pytest.approx(float(term.detach()), rel=1e-5)
            ref = ref + w * wd * term
    want = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    for p, g, w in zip(model.named_parameters(), got, want):
        assert g is not None and w is not None, p[0]
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, n=p[0]: f"{n}: {m}")


def test_fused_embedding_never_sees_the_caption() -> None:
    from helpers.align_two_ranks import build_model, global_batch

    model = build_model().eval()
    batch = global_batch()
    other = dict(batch, text={k: v.clone() for k, v in batch["text"].items()})
    other["text"]["tokens"] = (other["text"]["tokens"].float() + 1).half() * other["text"]["mask"].unsqueeze(-1)
    other["text"]["pooled"] = (other["text"]["pooled"].float() + 1).half()
    with torch.no_grad():
        e1, e2 = model.embed(batch), model.embed(other)
    assert not torch.allclose(e1["text"], e2["text"])
    assert torch.equal(e1["fused"], e2["fused"])
