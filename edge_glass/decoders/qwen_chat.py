"""Instruction examples tokenised with a Qwen chat template, prefix slots included.

    tokenize_example(tok, prompt, answer, num_prefix_tokens, max_length)
                                        -> {input_ids, labels, attention_mask, prefix_positions}
    tokenize_prompt(tok, prompt, num_prefix_tokens, max_length)
                                        -> {input_ids, attention_mask, prefix_positions}  (generation)
    collate_examples(examples, pad_id, padding_side="right") -> batch tensors

One training sequence is the chat template's rendering of a single user turn followed by the
assistant's answer and the end-of-turn token, contiguous and unpadded:

    <|im_start|>user\\n [P P P P] What colour is the shape?<|im_end|>\\n<|im_start|>assistant\\n red <|im_end|>
    |----------------- prompt (labels -100) ---------------------------------------------|  |-- supervised --|

The prompt part is exactly what `tokenize_prompt` gives for generation (the template's
generation prompt), so the model is trained on the same context it is later asked to continue.
Labels are -100 on the prompt and the prefix slots; the answer tokens and the closing
`<|im_end|>` are supervised, so the model learns to stop (a model that never sees the turn end
keeps generating past its answer).

How the prefix slots are located. The user message is rendered with a placeholder string
(`PREFIX_PLACEHOLDER`) at the place where the soft tokens go. The rendered text is split at that
string and the pieces are tokenised separately; in the gap go `num_prefix_tokens` copies of a
placeholder id (the pad id, any valid id would do). `prefix_positions` lists the indices of
those slots, and the decoder overwrites the embeddings at exactly those indices with the
connector's prefix embeddings, so the placeholder id's own embedding never reaches the model.
The placeholder string itself is never tokenised, so it needs no entry in the vocabulary and
works unchanged with any Qwen tokenizer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from edge_glass.decoders.base import IGNORE_INDEX

PREFIX_PLACEHOLDER = "<|edge_glass_prefix|>"
"""Marks where the soft prefix tokens go in the rendered user message; never tokenised."""


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def end_of_turn_id(tokenizer) -> int:
    """The id that ends an assistant turn: `<|im_end|>` for ChatML tokenizers, else the eos id.

    A Qwen2.5 *base* tokenizer has eos `<|endoftext|>` but its chat template still closes turns
    with `<|im_end|>`; the turn end is what the model must learn to emit and generation stops at.
    """
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end >= 0:
        return im_end
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token to end the answer with")
    return int(tokenizer.eos_token_id)


def placeholder_id(tokenizer) -> int:
    """The id put in the prefix slots (its embedding is overwritten) and in padding."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _encode(tokenizer, text: str) -> list[int]:
    # Special tokens written in the template text (<|im_start|>, ...) are parsed as such; no BOS
    # or other tokens are added (Qwen adds none anyway, but other tokenizers might).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _render_prompt(
    tokenizer,
    prompt: str,
    prefix_placeholder: str,
    system_prompt: str | None,
    chat_template_kwargs: dict | None,
) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (template before the prefix, the user's prompt text, template after it).

    The prefix slots go between the first two; the generation prompt (`<|im_start|>assistant\\n`,
    plus e.g. Qwen3's empty think block when `enable_thinking=False`) ends the third.
    """
    if prefix_placeholder in prompt:
        raise ValueError(f"the prompt contains the prefix placeholder {prefix_placeholder!r}: {prompt!r}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prefix_placeholder + prompt})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )
    if text.count(prefix_placeholder) != 1:
        raise ValueError(
            f"the chat template rendered the prefix placeholder {text.count(prefix_placeholder)} times "
            f"(expected once): {text!r}"
        )
    head, rest = text.split(prefix_placeholder)
    if not rest.startswith(prompt):
        raise ValueError(f"the chat template altered the user text {prompt!r}; rendered: {text!r}")
    return _encode(tokenizer, head), _encode(tokenizer, prompt), _encode(tokenizer, rest[len(prompt) :])


def _assemble(
    tokenizer,
    prompt: str,
    num_prefix_tokens: int,
    budget: int,
    prefix_placeholder: str,
    system_prompt: str | None,
    chat_template_kwargs: dict | None,
    context: str,
) -> tuple[list[int], list[int]]:
    """Prompt ids with the prefix slots, the user text cut from the left to fit `budget`; and the slots."""
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    head, text, tail = _render_prompt(tokenizer, prompt, prefix_placeholder, system_prompt, chat_template_kwargs)
    fixed = len(head) + num_prefix_tokens + len(tail)
    if fixed > budget:
        raise ValueError(
            f"{context}: the chat template ({len(head) + len(tail)} tokens) and {num_prefix_tokens} prefix "
            f"tokens alone need {fixed}, but only {budget} fit"
        )
    keep = budget - fixed
    if len(text) > keep:
        # Cut the start of the user text: the instruction or question usually ends it.
        text = text[len(text) - keep :]
    slots = list(range(len(head), len(head) + num_prefix_tokens))
    ids = head + [placeholder_id(tokenizer)] * num_prefix_tokens + text + tail
    return ids, slots


def tokenize_example(
    tokenizer,
    prompt: str,
    answer: str,
    num_prefix_tokens: int,
    max_length: int,
    prefix_placeholder: str = PREFIX_PLACEHOLDER,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict[str, list[int]]:
    """One training sequence `[prompt with prefix slots][answer][<|im_end|>]`, at most `max_length` ids.

    Only the answer tokens and the end-of-turn id carry labels; everything else is -100.
    Too long a sequence loses the start of the user text (never the template, the prefix, the
    answer or its end); if even those do not fit, a ValueError says by how much.
    """
    answer_ids = _encode(tokenizer, answer) + [end_of_turn_id(tokenizer)]
    budget = max_length - len(answer_ids)
    if budget < 0:
        raise ValueError(
            f"max_length {max_length} is too small: the answer and its end token alone take {len(answer_ids)} "
            f"tokens ({answer[:60]!r})"
        )
    prompt_ids, slots = _assemble(
        tokenizer, prompt, num_prefix_tokens, budget, prefix_placeholder, system_prompt, chat_template_kwargs,
        f"max_length {max_length} is too small: after the answer and its end token ({len(answer_ids)} tokens)",
    )
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": [1] * len(input_ids),
        "prefix_positions": slots,
    }


def tokenize_prompt(
    tokenizer,
    prompt: str,
    num_prefix_tokens: int,
    max_length: int,
    prefix_placeholder: str = PREFIX_PLACEHOLDER,
    *,
    system_prompt: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> dict[str, list[int]]:
    """The generation input: the same prompt part as `tokenize_example`, ending with the assistant's turn start."""
    ids, slots = _assemble(
        tokenizer, prompt, num_prefix_tokens, max_length, prefix_placeholder, system_prompt, chat_template_kwargs,
        f"max_length {max_length} is too small for the prompt",
    )
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "prefix_positions": slots}


# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


def collate_examples(
    examples: Sequence[dict[str, list[int]]], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of tokenised examples into tensors.

    Right padding (training) or left padding (batched generation, so every prompt ends where
    generation starts). Padded positions get `pad_id`, attention_mask 0 and label -100;
    `prefix_positions` are shifted by the left padding so they still point at the slots.
    Examples from `tokenize_prompt` (no labels) give a batch without `labels`.
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    num_slots = {len(e["prefix_positions"]) for e in examples}
    if len(num_slots) != 1:
        raise ValueError(f"examples have different numbers of prefix slots: {sorted(num_slots)}")
    has_labels = all("labels" in e for e in examples)
    length = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((batch, num_slots.pop()), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        start = 0 if padding_side == "right" else length - n
        input_ids[i, start : start + n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, start : start + n] = torch.tensor(e.get("attention_mask", [1] * n), dtype=torch.long)
        if has_labels:
            labels[i, start : start + n] = torch.tensor(e["labels"], dtype=torch.long)
        positions[i] = torch.tensor(e["prefix_positions"], dtype=torch.long) + start
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "prefix_positions": positions}
    if has_labels:
        out["labels"] = labels
    return out
