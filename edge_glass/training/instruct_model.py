"""The instruct-stage model: aligned adapters -> connector -> prefix tokens -> a decoder.

    features --adapters (from the align run)--> aligned embedding [B, D]       (connector_input pooled)
                                                or Perceiver latents [B, T, W] (connector_input tokens)
             --connector per prefix modality--> [B, num_prefix_tokens, decoder width], concatenated
             --row per instruction example---> the decoder's loss (decoders/base.py: Qwen's LM
                                                loss on answer + end of turn, the TRM's
                                                deep-supervision loss, a plug-in's own)

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
from edge_glass.decoders.base import Decoder
from edge_glass.decoders.registry import build_decoder
from edge_glass.models.alignment import AlignmentModel, FeatureInfo
from edge_glass.models.connector import Connector
from edge_glass.utils.params import counts


class InstructModel(nn.Module):
    def __init__(self, cfg: Config, features: dict[str, FeatureInfo]) -> None:
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        self.prefix_modalities = list(dec.prefix_modalities)
        self.lm_weight = cfg.loss.lm_weight
        self.align = AlignmentModel(cfg.model, cfg.loss, features)
        self.decoder: Decoder = build_decoder(dec)
        self.kind = self.decoder.kind
        width = self.decoder.width
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
        loss, parts = self.decoder.batch_loss(self.prefix(batch)[batch["example_sample"]], batch)
        return self.lm_weight * loss, parts

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(module, trainable, frozen) parameter counts: prefix adapters, connectors, decoder."""
        rows = []

        def count(name: str, module: nn.Module) -> None:
            rows.append((name, *counts(module.parameters())))  # full counts under ZeRO-3 too

        for m in self.prefix_modalities:
            count(f"adapters.{m}", self.align.adapters[m])
        for m, connector in self.connectors.items():
            count(f"connectors.{m}", connector)
        count(f"decoder ({self.kind})", self.decoder)
        return rows
