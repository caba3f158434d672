"""The instruct-stage model: aligned adapters -> connector -> prefix tokens -> decoder (Qwen or TRM).

    features --adapters (from the align run)--> aligned embedding [B, D]       (connector_input pooled)
                                                or Perceiver latents [B, T, W] (connector_input tokens)
             --connector per prefix modality--> [B, num_prefix_tokens, decoder width], concatenated
             --row per instruction example---> decoder loss (Qwen: LM loss on answer + EOS;
                                                TRM: deep-supervision loss)

The adapters are the align stage's `AlignmentModel` (the same class, so an align checkpoint loads
into it by name). Adapters of modalities that are not a prefix never run and never train; the
prefix adapters train only with `train.freeze_adapters: false`. Frozen adapters run without
autograd and stay in eval mode (no dropout) even while the rest trains.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from edge_glass.config import Config
from edge_glass.decoders.causal_baseline import CausalBaseline
from edge_glass.decoders.trm import TRM, TRMBatch, deep_supervision_loss
from edge_glass.models.alignment import AlignmentModel, FeatureInfo
from edge_glass.models.connector import Connector


class InstructModel(nn.Module):
    def __init__(self, cfg: Config, features: dict[str, FeatureInfo]) -> None:
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        # "causal": the TRM section's network as a plain causal decoder (the baseline).
        self.kind = "causal" if dec.kind == "trm" and not dec.trm.recursive else dec.kind
        self.prefix_modalities = list(dec.prefix_modalities)
        self.lm_weight = cfg.loss.lm_weight
        self.align = AlignmentModel(cfg.model, cfg.loss, features)
        if dec.kind == "qwen":
            from edge_glass.decoders.qwen import QwenDecoder

            self.decoder: nn.Module = QwenDecoder(dec.qwen)
            width = self.decoder.hidden_size
        elif dec.trm.recursive:
            self.decoder = TRM(dec.trm)
            width = dec.trm.hidden_dim
        else:
            self.decoder = CausalBaseline(dec.trm)
            width = dec.trm.hidden_dim
        self.connectors = nn.ModuleDict()
        for m in self.prefix_modalities:
            in_dim = cfg.model.shared_dim if dec.connector_input == "pooled" else getattr(cfg.model.adapters, m).hidden_dim
            self.connectors[m] = Connector(
                in_dim, width, dec.num_prefix_tokens, dec.connector, dec.connector_input, hidden_dim=dec.connector_hidden_dim
            )
        self.adapters_frozen = cfg.train.freeze_adapters
        for name, p in self.align.named_parameters():
            in_prefix = any(name.startswith(f"adapters.{m}.") for m in self.prefix_modalities)
            p.requires_grad_(in_prefix and not self.adapters_frozen)
        # Modules are built in training mode; apply the frozen-adapter rule from the start, not
        # from the first mode switch (which would make the first steps of a fresh run and of a
        # resumed one differ).
        self.train()

    @property
    def tokenizer(self):
        return self.decoder.tokenizer

    def special_ids(self) -> tuple[int, int]:
        """(pad id, end-of-answer id) the batches are built with."""
        if self.kind == "qwen":
            return self.decoder.pad_id, self.decoder.end_of_turn_id
        return self.decoder.pad_id, self.decoder.eos_id

    def train(self, mode: bool = True) -> "InstructModel":
        super().train(mode)
        if self.adapters_frozen:
            self.align.eval()  # frozen adapters: no dropout, ever
        return self

    def prefix(self, batch: dict) -> torch.Tensor:
        """Prefix embeddings [B, P, width] of the batch's samples (P = modalities x num_prefix_tokens)."""
        parts = []
        grad = contextlib.nullcontext() if not self.adapters_frozen else torch.no_grad()
        for m in self.prefix_modalities:
            adapter = self.align.adapters[m]
            with grad:
                x = adapter.resampled_tokens(batch[m]) if self.cfg.decoder.connector_input == "tokens" else adapter(batch[m])
            parts.append(self.connectors[m](x))
        return torch.cat(parts, dim=1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached terms for logging) of one instruction batch."""
        prefix = self.prefix(batch)[batch["example_sample"]]
        if self.kind == "qwen":
            out = self.decoder(prefix, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prefix_positions"])
            return self.lm_weight * out.loss, {}
        if self.kind == "causal":
            loss, _ = self.decoder.loss(prefix, batch["question_ids"], batch["question_mask"], batch["labels"])
            return self.lm_weight * loss, {}
        trm_batch = TRMBatch(batch["question_ids"], batch["question_mask"], batch["labels"], prefix)
        loss, stats = deep_supervision_loss(self.decoder, trm_batch)
        return self.lm_weight * loss, {f"trm/{k}": torch.tensor(v) for k, v in stats.items() if k in ("exact", "first_exact")}

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(module, trainable, frozen) parameter counts: prefix adapters, connectors, decoder."""
        rows = []

        def count(name: str, module: nn.Module) -> None:
            params = list(module.parameters())
            rows.append((name, sum(p.numel() for p in params if p.requires_grad),
                         sum(p.numel() for p in params if not p.requires_grad)))

        for m in self.prefix_modalities:
            count(f"adapters.{m}", self.align.adapters[m])
        for m, connector in self.connectors.items():
            count(f"connectors.{m}", connector)
        count(f"decoder ({self.kind})", self.decoder)
        return rows
