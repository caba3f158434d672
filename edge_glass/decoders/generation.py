"""Answer generation with a soft prefix, and the QA metrics (SQuAD exact match and token F1).

`generate` left-pads the prompts (so every row ends where the answer starts), overwrites the
prefix slots with the prefix embeddings, and runs Hugging Face `generate` on `inputs_embeds`
with its KV cache. Given embeddings and no ids, HF returns only the new tokens. Decoding stops at
the end-of-turn token (`<|im_end|>`). Everything after it is dropped. The generation settings are
spelled out in full, so a checkpoint's `generation_config.json` cannot slip in its own sampling
defaults: Qwen instruct models ship with do_sample, top_k 20 and repetition_penalty 1.05.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

import torch

from edge_glass.decoders.qwen_chat import collate_examples


@torch.no_grad()
def generate_ids(
    decoder,
    prefix_embeds: torch.Tensor | None,
    prompts: Sequence[dict],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    synced_gpus: bool | None = None,
    stream: Callable[[str], None] | None = None,
) -> list[list[int]]:
    """New token ids per prompt, up to and including the first end-of-turn id (if one came).

    `decoder` is a `QwenDecoder`; `prompts` are `tokenize_prompt` outputs (one per row of
    `prefix_embeds` [B, N, H]). The decoder is put in eval mode for the call (dropout off) and
    restored after. `synced_gpus` must be True under ZeRO-3 (the weights are sharded).
    `stream` (one prompt only) receives the answer's text as it is generated.
    """
    from transformers import GenerationConfig

    if prefix_embeds is not None and prefix_embeds.shape[0] != len(prompts):
        raise ValueError(f"{prefix_embeds.shape[0]} prefix rows for {len(prompts)} prompts")
    batch = collate_examples(prompts, decoder.pad_id, padding_side="left")
    device = decoder.device
    inputs_embeds = decoder.embed(
        batch["input_ids"].to(device),
        prefix_embeds,
        batch["prefix_positions"].to(device),
    )
    eos = decoder.end_of_turn_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,  # 0 turns off a checkpoint's top_k when sampling
        repetition_penalty=1.0,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=decoder.pad_id,
        use_cache=True,
    )
    was_training = decoder.training
    decoder.eval()
    try:
        out = decoder.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=batch["attention_mask"].to(device),
            generation_config=config,
            synced_gpus=synced_gpus,
            streamer=None if stream is None else _CallbackStreamer(decoder.tokenizer, stream, len(prompts)),
        )
    finally:
        decoder.train(was_training)
    results = []
    for row in out.tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        results.append(row)
    return results


def generate(
    decoder,
    prefix_embeds: torch.Tensor | None,
    prompts: Sequence[dict],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    synced_gpus: bool | None = None,
    stream: Callable[[str], None] | None = None,
) -> list[str]:
    """The decoded answers (new tokens only, special tokens stripped); see `generate_ids`."""
    ids = generate_ids(
        decoder, prefix_embeds, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_p=top_p, synced_gpus=synced_gpus, stream=stream,
    )
    return [decoder.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def _CallbackStreamer(tokenizer, callback: Callable[[str], None], rows: int):
    """HF's `TextStreamer`, handing each finished piece of text to `callback` instead of print.

    It decodes the growing token list and releases text only up to the last space or newline,
    so a word split over several tokens (or a multi-byte character) never arrives half done. With
    `inputs_embeds` and no ids, generate's first `put` is the empty prompt: `skip_prompt` drops it.
    The answer's leading whitespace is dropped, as `generate` strips it from the finished answer.
    """
    from transformers import TextStreamer

    if rows != 1:
        raise ValueError(f"streaming answers one prompt at a time, got {rows}")

    class CallbackStreamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            if text:
                callback(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# Metrics (SQuAD v1.1 evaluation script semantics)
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (bag of tokens)."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)
