"""Instruction batches from feature-store batches: examples, tokens and labels for the decoder.

A `FeatureLoader(with_meta=True, transform=batcher.train_batch)` batch holds the features of B
samples, their captions and their raw JSON. Each sample gives one example per caption and QA pair
(`decoder.instructions` chooses which, `data/instruct.py` makes them), so a batch of B samples
becomes N >= B sequences; `example_sample` [N] says which sample's prefix each sequence takes.
The decoder's inputs are built here, in the loader's prefetch thread, so tokenisation overlaps
the training step.

    Qwen:  input_ids / attention_mask / labels / prefix_positions, rendered with the chat template
           (`tokenize_example`); evaluation adds `prompts` (the same prompt part, for generation).
    TRM:   question_ids / question_mask (the plain prompt, no template: the TRM has no chat
           format) and fixed-length labels [N, max_answer_len] (answer, EOS, -100).

Evaluation batches also carry the gold `answers`, `kinds`, `attributes` and `example_keys`, for
exact match, token F1 and the per-attribute breakdown.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_glass.config import Config
from edge_glass.data.instruct import collate_examples, examples_from_meta, tokenize_example, tokenize_prompt
from edge_glass.decoders.trm import answer_targets, pad_questions
from edge_glass.utils.errors import UserError


class InstructBatcher:
    """Tokenises the instruction examples of feature batches for the configured decoder."""

    def __init__(self, cfg: Config, tokenizer, *, pad_id: int, eos_id: int) -> None:
        self.cfg = cfg
        self.kind = cfg.decoder.kind
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id = pad_id, eos_id
        self.num_prefix_tokens = cfg.decoder.num_prefix_tokens * len(cfg.decoder.prefix_modalities)
        self.template_kwargs: dict[str, Any] = {}
        if self.kind == "qwen" and cfg.decoder.qwen.enable_thinking is not None:
            self.template_kwargs["enable_thinking"] = cfg.decoder.qwen.enable_thinking

    def examples(self, batch: dict) -> tuple[list[dict], list[int]]:
        """Every instruction example of the batch's samples, and the sample each came from."""
        include = self.cfg.decoder.instructions
        examples, owner = [], []
        for i, (meta, caption) in enumerate(zip(batch["meta"], batch["captions"])):
            for ex in examples_from_meta(
                meta, caption, modalities=self.cfg.decoder.prefix_modalities,
                include_caption="caption" in include, include_qa="qa" in include,
            ):
                ex["key"] = batch["keys"][i]
                examples.append(ex)
                owner.append(i)
        if not examples:
            # Every later step would fail the same way; say what to change.
            raise UserError(
                f"decoder.instructions {include} give no example for samples {batch['keys'][:3]}...: "
                "the data has no captions/QA of that kind"
            )
        return examples, owner

    def train_batch(self, batch: dict) -> dict:
        """The feature batch plus the decoder's training inputs."""
        return self._build(batch)[0]

    def eval_batch(self, batch: dict) -> dict:
        """`train_batch` plus what generation and scoring need."""
        out, examples = self._build(batch)
        out["answers"] = [e["answer"] for e in examples]
        out["kinds"] = [e["kind"] for e in examples]
        out["attributes"] = [e["attribute"] for e in examples]
        out["example_keys"] = [e["key"] for e in examples]
        out["questions"] = [e["prompt"] for e in examples]
        if self.kind == "qwen":
            out["prompts"] = [self._prompt(e["prompt"]) for e in examples]
        return out

    # ------------------------------------------------------------------------------------

    def _build(self, batch: dict) -> tuple[dict, list[dict]]:
        examples, owner = self.examples(batch)
        out = dict(batch)
        out["example_sample"] = torch.tensor(owner, dtype=torch.long)
        out.update(self._tokenise(examples))
        return out, examples

    def _tokenise(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if self.kind == "qwen":
            qwen = self.cfg.decoder.qwen
            tokenised = [
                tokenize_example(
                    self.tokenizer, e["prompt"], e["answer"], self.num_prefix_tokens, qwen.max_length,
                    system_prompt=self.cfg.decoder.system_prompt, chat_template_kwargs=self.template_kwargs,
                )
                for e in examples
            ]
            return collate_examples(tokenised, self.pad_id, padding_side="right")
        encode = self._encode
        question_ids, question_mask = pad_questions([encode(e["prompt"]) for e in examples], self.pad_id)
        labels = answer_targets([encode(e["answer"]) for e in examples], self.cfg.decoder.trm.max_answer_len, self.eos_id)
        return {"question_ids": question_ids, "question_mask": question_mask, "labels": labels}

    def _prompt(self, prompt: str) -> dict:
        return tokenize_prompt(
            self.tokenizer, prompt, self.num_prefix_tokens, self.cfg.decoder.qwen.max_length,
            system_prompt=self.cfg.decoder.system_prompt, chat_template_kwargs=self.template_kwargs,
        )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
