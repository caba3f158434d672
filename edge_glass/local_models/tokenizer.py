"""A byte-level BPE tokenizer trained in memory, with Qwen2's special tokens and ChatML template.

The tiny causal LM needs a tokenizer that behaves like a Qwen2 instruct tokenizer (same special
tokens, same chat format, `<|im_end|>` ends a turn) but whose vocabulary is small enough that
the embedding matrix stays tiny and every synthetic answer word is one or two tokens. Training
one from the project's own text takes milliseconds, needs no download, and is deterministic.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
"""In Qwen2's order (151643, 151644, 151645 there); they get ids 0, 1, 2 here."""

# Qwen2's ChatML format without its default system prompt (a tiny model gains nothing from one,
# and prompts stay exactly what the caller wrote). The `generation` block marks what the
# assistant says, so `apply_chat_template(..., return_assistant_tokens_mask=True)` can build
# loss masks for instruction tuning.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """Train a Qwen2-style byte-level BPE on `texts`.

    The result is a `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`) with `<|endoftext|>` (pad),
    `<|im_start|>`, `<|im_end|>` (eos, as in Qwen2 instruct models) and the ChatML chat
    template. `vocab_size` is an upper bound: a small corpus runs out of merges before it.
    """
    # Train with Qwen2's own normalizer (NFC) and pre-tokenizer (its split regex, then bytes),
    # taken from an empty Qwen2Tokenizer. AutoTokenizer reloads any checkpoint whose config is
    # model_type "qwen2" as Qwen2Tokenizer, which rebuilds exactly these; training with GPT-2's
    # pre-tokenizer instead would make the reloaded tokenizer split some text differently.
    qwen2 = Qwen2Tokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = qwen2.normalizer
    tok.pre_tokenizer = qwen2.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bpe = json.loads(tok.to_str())["model"]
    hf = Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(pair) for pair in bpe["merges"]],
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        additional_special_tokens=[IM_START],
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf
