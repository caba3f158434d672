"""Packed instruction batches: several examples per row, no attention across them, no padding waste.

A padded batch is as long as its longest example: on a QA mix whose examples run from 40 to 400
tokens, most of the step is spent on padding. Packing puts the examples of a batch one after
another into rows of at most `row_length` tokens (`pack_order`: the fewest positions it can find,
since the batch is rows x its fullest row) and tells the model where each example starts
through its position ids:

    row 0:  [ex 3 .......................][ex 0 ..........][ex 5 ....][pad]
    pos  :   0 1 2 ...                n-1  0 1 2 ...       0 1 ...     0 1
    row 1:  [ex 1 ...................][ex 4 ...........][ex 2 .......]

Each example keeps the position ids it has alone (0, 1, 2, ... from its first token), so rotary
embeddings see the same positions as unpacked, and Hugging Face's models turn position ids that
restart into attention that stays inside each example (a block-diagonal causal mask for SDPA and
eager attention, `masking_utils.find_packed_sequence_indices`; variable-length kernels for
flash-attention 2, which finds the boundaries only in a batch of one row: `flatten_rows` lays
the rows end to end for it). That needs `attention_mask` to be None, which is why a packed batch
has none. The row's tail of padding gets its own restarting positions, so it forms a segment of its
own that no example attends to; its labels are -100.

Losses are per token and an example's first token is its prompt's (never supervised), so no
token is ever predicted across an example boundary: the per-example losses, and so the batch's
mean, equal the unpacked ones up to floating-point summation order (tests/test_packing.py).

Hand-written because the packing itself is a few lines of bookkeeping that has to place the
prefix slots of each example: TRL's packing and transformers' `DataCollatorWithFlattening`
flatten a whole batch into one row and know nothing of soft-prefix slots.
"""

from __future__ import annotations

from typing import Sequence

import torch

from edge_glass.decoders.base import IGNORE_INDEX


def pack_order(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `row_length` tokens, so that rows x the
    fullest row (the positions the batch computes) is as small as this search finds.

    First-fit decreasing into rows of a width W, for a few widths from the longest example up to
    `row_length`; the cheapest wins. Examples short against the row pack into few rows; examples
    nearly as long as a row pack at a narrower width than `row_length` (a wide row that cannot
    be filled would cost more than padding). W = the longest example is among the candidates and
    first-fit never needs more rows than examples, so a packed batch never computes more
    positions than the padded one. Deterministic (ties broken by index and by the narrower
    width), so a resumed run packs a batch exactly as before. Within a row the examples keep
    their original order.
    """
    if not lengths:
        return []
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than a row's {row_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = lengths[order[0]]
    best: tuple[int, list[list[int]]] | None = None
    for width in sorted({longest + (row_length - longest) * k // 8 for k in range(9)}):
        rows, room = [], []
        for i in order:
            r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if r is None:
                rows.append([i])
                room.append(width - lengths[i])
            else:
                rows[r].append(i)
                room[r] -= lengths[i]
        cost = len(rows) * (width - min(room))
        if best is None or cost < best[0]:
            best = (cost, rows)
    return [sorted(row) for row in best[1]]


def collate_packed(examples: Sequence[dict[str, list[int]]], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Tokenised examples (`qwen_chat.tokenize_example`) packed into rows.

    Returns `input_ids`, `labels` and `position_ids` [R, L] (L the longest packed row), and, per
    example in the given order, `prefix_rows` and `prefix_positions` [E, P]: the row and column
    of each prefix slot, so the prefix embeddings of example e land where its slots are.
    `num_tokens` (0-d) counts the real tokens, padding excluded.
    """
    if not examples:
        raise ValueError("collate_packed needs at least one example")
    num_slots = {len(e["prefix_positions"]) for e in examples}
    if len(num_slots) != 1:
        raise ValueError(f"examples have different numbers of prefix slots: {sorted(num_slots)}")
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_order(lengths, row_length)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    prefix_rows = torch.zeros((len(examples), num_slots.pop()), dtype=torch.long)
    prefix_positions = torch.zeros_like(prefix_rows)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e, n = examples[i], lengths[i]
            input_ids[r, start : start + n] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[r, start : start + n] = torch.tensor(e["labels"], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            prefix_rows[i] = r
            prefix_positions[i] = torch.tensor(e["prefix_positions"], dtype=torch.long) + start
            start += n
        # The padding restarts at 0 too: a segment of its own, attended by no example.
        position_ids[r, start:] = torch.arange(width - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "prefix_rows": prefix_rows,
            "prefix_positions": prefix_positions, "num_tokens": torch.tensor(sum(lengths), dtype=torch.long)}


def flatten_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch as one row, its rows end to end (what flash-attention 2 needs in
    transformers: it reads example boundaries from restarting position ids only in a batch of
    one row, and would let a row's examples attend to each other otherwise). Each row starts a
    segment anyway (its first example, or its padding, starts at position 0), and a row's first
    token is a prompt's, never supervised, so the loss is unchanged."""
    rows, width = batch["input_ids"].shape
    out = dict(batch)
    for name in ("input_ids", "labels", "position_ids"):
        out[name] = batch[name].reshape(1, rows * width)
    out["prefix_positions"] = batch["prefix_positions"] + batch["prefix_rows"] * width
    out["prefix_rows"] = torch.zeros_like(batch["prefix_rows"])
    return out
