"""Instruction batches from feature-store batches: examples, then the decoder's own inputs.

A `FeatureLoader(with_meta=True, transform=batcher.train_batch)` batch holds the features of B
samples, their captions and their raw JSON. Each sample gives one example per caption and QA pair
(`decoder.instructions` chooses which, `data/instruct.py` makes them), so a batch of B samples
becomes N >= B sequences; `example_sample` [N] says which sample's prefix each sequence takes.
The decoder turns the examples into its inputs (`Decoder.encode_examples`: a chat template with
prefix slots for Qwen, a plain question and fixed-length answer labels for the TRM), here, in
the loader's prefetch thread, so tokenisation overlaps the training step.

Evaluation batches also carry what generation needs (`Decoder.generation_inputs`) and the gold
`answers`, `kinds`, `attributes` and `example_keys`, for exact match, token F1 and the
per-attribute breakdown.
"""

from __future__ import annotations

import torch

from edge_glass.config import Config
from edge_glass.data.instruct import examples_from_meta
from edge_glass.decoders.base import Decoder
from edge_glass.utils.errors import UserError


class InstructBatcher:
    """Turns the instruction examples of feature batches into the decoder's inputs."""

    def __init__(self, cfg: Config, decoder: Decoder) -> None:
        self.cfg = cfg
        self.decoder = decoder
        self.num_prefix_tokens = cfg.decoder.num_prefix_tokens * len(cfg.decoder.prefix_modalities)

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
        return self._build(batch, self.decoder.encode_examples)[0]

    def eval_batch(self, batch: dict) -> dict:
        """The feature batch, the decoder's inputs one row per example (evaluation cuts batches
        by example), and what generation and scoring need."""
        out, examples = self._build(batch, getattr(self.decoder, "encode_eval_examples", self.decoder.encode_examples))
        out["answers"] = [e["answer"] for e in examples]
        out["kinds"] = [e["kind"] for e in examples]
        out["attributes"] = [e["attribute"] for e in examples]
        out["example_keys"] = [e["key"] for e in examples]
        out["questions"] = [e["prompt"] for e in examples]
        out.update(self.decoder.generation_inputs(examples, self.num_prefix_tokens))
        return out

    # ------------------------------------------------------------------------------------

    def _build(self, batch: dict, encode) -> tuple[dict, list[dict]]:
        examples, owner = self.examples(batch)
        out = dict(batch)
        out["example_sample"] = torch.tensor(owner, dtype=torch.long)
        out.update(encode(examples, self.num_prefix_tokens))
        return out, examples
