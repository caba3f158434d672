"""Packed instruction batches (decoders/packing.py): the same per-example losses and gradients
as one example per padded row, with the prefix slots where each example has them."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.decoders.packing import collate_packed, flatten_rows, pack_order


def test_pack_order_places_every_example_once_in_few_well_filled_rows():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(200)]
    rows = pack_order(lengths, 64)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(200))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= 64
    assert all(row == sorted(row) for row in rows)
    # The batch computes rows x its fullest row; nearly all of that is real tokens here.
    assert sum(lengths) / (len(rows) * max(loads)) > 0.9
    assert pack_order(lengths, 64) == rows, "the same batch packs the same way (exact resume)"
    with pytest.raises(ValueError, match="example 1 has 70 tokens, more than a row's 64"):
        pack_order([3, 70], 64)


@pytest.mark.parametrize("seed", range(20))
def test_a_packed_batch_never_computes_more_positions_than_the_padded_one(seed):
    rng = random.Random(seed)
    row_length = rng.choice([16, 64, 128])
    lengths = [rng.randint(1, row_length) for _ in range(rng.randint(1, 40))]
    rows = pack_order(lengths, row_length)
    packed = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
    assert packed <= len(lengths) * max(lengths)


def test_collate_packed_puts_each_example_and_its_prefix_slots_in_its_span():
    examples = [
        {"input_ids": [10, 11, 0, 0, 12, 13], "labels": [-100, -100, -100, -100, 12, 13], "prefix_positions": [2, 3]},
        {"input_ids": [20, 0, 0, 21], "labels": [-100, -100, -100, 21], "prefix_positions": [1, 2]},
        {"input_ids": [30, 0, 0, 31, 32, 33, 34], "labels": [-100, -100, -100, -100, -100, 33, 34], "prefix_positions": [1, 2]},
    ]
    out = collate_packed(examples, pad_id=0, row_length=11)
    # 17 tokens need 2 rows of 11; longest first, each to the emptier row: 7 | 6, then 4 beside the 6.
    assert pack_order([6, 4, 7], 11) == [[2], [0, 1]]
    assert out["input_ids"].tolist() == [[30, 0, 0, 31, 32, 33, 34, 0, 0, 0], [10, 11, 0, 0, 12, 13, 20, 0, 0, 21]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
    assert out["labels"][0, 7:].tolist() == [IGNORE_INDEX] * 3
    assert out["labels"][1].tolist() == [-100, -100, -100, -100, 12, 13, -100, -100, -100, 21]
    assert out["prefix_rows"].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert out["prefix_positions"].tolist() == [[2, 3], [7, 8], [1, 2]]
    assert int(out["num_tokens"]) == 17


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from edge_glass.local_models.build import build_local_models

    # The session's shared tiny models (built once, reused by other modules' fixtures).
    return build_local_models(tmp_path_factory.getbasetemp() / "local-models", include_real=False)["qwen2-tiny"]


EXAMPLES = [
    {"prompt": "What colour is the shape?", "answer": "red"},
    {"prompt": "Describe the image in a few words, please, with every detail you can see.",
     "answer": "a large green star at the top left, beside a small blue circle"},
    {"prompt": "Where is it?", "answer": "bottom"},
    {"prompt": "How many shapes are there in this picture?", "answer": "three"},
    {"prompt": "Name the shape.", "answer": "triangle"},
]


def _decoder(qwen_dir, packing: bool, chunk, attention="sdpa"):
    from edge_glass.config import LoraConfig, QwenConfig
    from edge_glass.decoders.qwen import QwenDecoder

    torch.manual_seed(0)  # the same LoRA initialisation for every layout
    # No LoRA dropout: its masks depend on the batch's shape.
    return QwenDecoder(QwenConfig(model=str(qwen_dir), tune="lora", lora=LoraConfig(dropout=0.0), max_length=96,
                                  loss_chunk_rows=chunk, packing=packing, attention=attention))


def _per_example_losses(dec, batch, prefix) -> list[float]:
    """Summed token cross-entropy of each example, from the full logits of either layout."""
    packed = "position_ids" in batch
    out = dec(prefix, batch["input_ids"], None if packed else batch["attention_mask"], None, batch["prefix_positions"],
              position_ids=batch.get("position_ids"), prefix_rows=batch.get("prefix_rows"))
    token_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none").view(batch["labels"].shape[0], -1)
    if not packed:
        return token_loss.sum(1).tolist()
    lengths = []
    spans = {}
    # Each example's span in its row, from where its prefix slots landed and its length.
    tokenised = [len(t) for t in _lengths(dec)]
    for row_index, row in enumerate(pack_order(tokenised, dec.cfg.max_length)):
        start = 0
        for i in row:
            spans[i] = (row_index, start, start + tokenised[i])
            start += tokenised[i]
    for i in range(len(EXAMPLES)):
        r, a, b = spans[i]
        lengths.append(float(token_loss[r, a : b - 1].sum()))  # positions a..b-2 predict tokens a+1..b-1
    return lengths


def _lengths(dec):
    from edge_glass.decoders.qwen_chat import tokenize_example

    return [tokenize_example(dec.tokenizer, e["prompt"], e["answer"], 4, dec.cfg.max_length)["input_ids"] for e in EXAMPLES]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_per_example_losses_equal_the_unpacked_ones(qwen_dir, attention):
    prefix = torch.randn(len(EXAMPLES), 4, 64, generator=torch.Generator().manual_seed(1))
    losses = {}
    for packing in (False, True):
        dec = _decoder(qwen_dir, packing, chunk=None, attention=attention)
        assert prefix.shape[-1] == dec.width
        batch = dec.encode_examples(EXAMPLES, 4)
        if packing:
            assert batch["input_ids"].shape[0] < len(EXAMPLES), "several examples share a row"
        with torch.no_grad():
            losses[packing] = _per_example_losses(dec, batch, prefix)
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-5)
    assert len(set(round(x, 3) for x in losses[True])) == len(EXAMPLES), "the examples' losses differ from each other"


@pytest.mark.parametrize("chunk", [None, 7])
def test_packed_batch_loss_and_gradients_equal_the_padded_batch(qwen_dir, chunk):
    results = {}
    for packing in (False, True):
        dec = _decoder(qwen_dir, packing, chunk)
        batch = dec.encode_examples(EXAMPLES, 4)
        prefix = torch.randn(len(EXAMPLES), 4, dec.width, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss, _ = dec.batch_loss(prefix, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.requires_grad}
        tokens = dec.eval_loss(prefix.detach(), batch)[1]
        results[packing] = (loss.detach(), prefix.grad.clone(), grads, tokens, int(batch["num_tokens"]))
    (pad_loss, pad_prefix, pad_grads, pad_tokens, pad_real), (pk_loss, pk_prefix, pk_grads, pk_tokens, pk_real) = \
        results[False], results[True]
    torch.testing.assert_close(pk_loss, pad_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pk_prefix, pad_prefix, rtol=1e-4, atol=1e-6)
    assert pad_grads.keys() == pk_grads.keys() and pad_grads
    for name in pad_grads:
        torch.testing.assert_close(pk_grads[name], pad_grads[name], rtol=1e-4, atol=1e-6)
    assert pk_tokens == pad_tokens, "the same supervised tokens"
    assert pk_real == pad_real, "the same real tokens, padding excluded"


def test_what_sits_in_a_packed_row_s_padding_changes_nothing(qwen_dir):
    dec = _decoder(qwen_dir, True, chunk=None)
    batch = dec.encode_examples(EXAMPLES, 4)
    prefix = torch.randn(len(EXAMPLES), 4, dec.width, generator=torch.Generator().manual_seed(1))
    padding = batch["labels"].eq(IGNORE_INDEX) & torch.zeros_like(batch["labels"], dtype=torch.bool)
    # The tail of each row after its last example: the positions past the real tokens.
    used = {}
    for r, row in enumerate(pack_order([len(t) for t in _lengths(dec)], dec.cfg.max_length)):
        used[r] = sum(len(_lengths(dec)[i]) for i in row)
        padding[r, used[r]:] = True
    assert padding.any(), "the batch has padding to change"
    with torch.no_grad():
        before = dec.batch_loss(prefix, batch)[0]
        changed = dict(batch, input_ids=torch.where(padding, torch.full_like(batch["input_ids"], 7), batch["input_ids"]))
        after = dec.batch_loss(prefix, changed)[0]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_packed_rows_laid_end_to_end_give_the_same_loss(qwen_dir):
    """The one-row layout flash-attention 2 gets (flatten_rows), checked here through SDPA, which
    finds the same example boundaries from the restarting position ids."""
    dec = _decoder(qwen_dir, True, chunk=None)
    batch = dec.encode_examples(EXAMPLES, 4)
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, batch["input_ids"].numel())
    prefix = torch.randn(len(EXAMPLES), 4, dec.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows_loss = dec.batch_loss(prefix, batch)[0]
        flat_loss = dec.batch_loss(prefix, flat)[0]
    torch.testing.assert_close(flat_loss, rows_loss, rtol=1e-5, atol=1e-6)
    # The prefix slots still hold the placeholder id, where each example put them.
    assert (flat["input_ids"][0, flat["prefix_positions"].flatten()] == dec.pad_id).all()
