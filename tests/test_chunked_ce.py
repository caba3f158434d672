"""The chunked linear cross-entropy (decoders/chunked_ce.py) gives the plain loss and gradients,
and the Qwen decoder's loss through it equals Hugging Face's own loss on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.decoders.chunked_ce import full_cross_entropy, linear_cross_entropy, supervised_rows


def _problem(n=37, h=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # unsupervised rows: prompt, prefix slots, padding
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_rows", [1, 8, 1000])
def test_chunked_loss_and_gradients_equal_the_full_logits_path(chunk_rows):
    hidden, weight, targets = _problem()
    plain = F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE_INDEX)
    gh, gw = torch.autograd.grad(plain * 3.0, (hidden, weight))  # an upstream factor reaches both
    chunked = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    ch, cw = torch.autograd.grad(chunked * 3.0, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ch, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-6)
    assert ch[targets == IGNORE_INDEX].abs().sum() == 0, "an unsupervised row gets no gradient"


def test_a_frozen_head_gets_no_gradient_and_bf16_matches_within_its_precision():
    hidden, weight, targets = _problem()
    weight = weight.detach()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=7)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    h16, w16, _ = _problem(dtype=torch.bfloat16)
    ref = full_cross_entropy(h16, w16, targets)  # the head in bf16, the loss in float32, as HF does
    ref_grads = torch.autograd.grad(ref, (h16, w16))
    got = linear_cross_entropy(h16, w16, targets, chunk_rows=5)
    got_grads = torch.autograd.grad(got, (h16, w16))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(got_grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)  # bf16 rounding of the same products
    # No supervised row at all: a zero loss that still backpropagates.
    none = torch.full_like(targets, IGNORE_INDEX)
    zero = linear_cross_entropy(hidden, weight, none)
    zero.backward()
    assert float(zero.detach()) == 0.0


def test_supervised_rows_are_the_causal_shift_of_the_labelled_positions():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX]])
    h, y = supervised_rows(hidden, labels)
    # Position t predicts token t+1: rows (0,1), (0,2) predict 7, 8; row (1,0) predicts 5.
    assert y.tolist() == [7, 8, 5] and h.flatten().tolist() == [1.0, 2.0, 4.0]


def test_the_qwen_decoder_s_chunked_loss_equals_hugging_face_s_full_logits_loss(tmp_path):
    from edge_glass.config import LoraConfig, QwenConfig
    from edge_glass.decoders.qwen import QwenDecoder
    from edge_glass.local_models.build import build_local_models

    models = build_local_models(tmp_path, include_real=False, seed=0)
    examples = [{"prompt": "What colour is the shape?", "answer": "red"},
                {"prompt": "Describe the image in a few words, please.", "answer": "a large green star at the top"}]
    results = {}
    for chunk in (None, 3):
        torch.manual_seed(0)
        dec = QwenDecoder(QwenConfig(model=str(models["qwen2-tiny"]), tune="lora", lora=LoraConfig(),
                                     loss_chunk_rows=chunk))
        batch = dec.encode_examples(examples, 4)
        prefix = torch.randn(2, 4, dec.width, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss, _ = dec.batch_loss(prefix, batch)
        loss.backward()
        lora = {n: p.grad.clone() for n, p in dec.named_parameters() if p.requires_grad}
        results[chunk] = (loss.detach(), prefix.grad.clone(), lora)
    (plain, plain_prefix, plain_lora), (chunked, chunked_prefix, chunked_lora) = results[None], results[3]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_prefix, plain_prefix, rtol=1e-4, atol=1e-6)
    assert plain_lora.keys() == chunked_lora.keys() and plain_lora
    for name in plain_lora:
        torch.testing.assert_close(chunked_lora[name], plain_lora[name], rtol=1e-4, atol=1e-6)


def test_an_enclosing_autocast_changes_nothing():
    hidden, weight, targets = _problem()
    plain = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    plain_grads = torch.autograd.grad(plain, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    under_grads = torch.autograd.grad(under, (hidden, weight))
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain)
    for a, b in zip(under_grads, plain_grads):
        torch.testing.assert_close(a, b)
