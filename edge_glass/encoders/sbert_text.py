"""Frozen Sentence-BERT: word-piece token embeddings of true length, and the sentence embedding."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from edge_glass.config import TextEncoderConfig, check_model_dir
from edge_glass.encoders.base import EncodedBatch, FrozenEncoder, weights_fingerprint


class SentenceTransformerTextEncoder(FrozenEncoder):
    modality = "text"

    def __init__(self, cfg: TextEncoderConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        from sentence_transformers import SentenceTransformer

        check_model_dir(cfg.model, "encoders.text.model")
        self.cfg = cfg
        model = SentenceTransformer(cfg.model, device="cpu", revision=cfg.revision)
        self.weights = weights_fingerprint(model)
        if cfg.max_length is not None:
            model.max_seq_length = cfg.max_length
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def token_dim(self) -> int:
        return self.model[0].auto_model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.get_embedding_dimension()

    def prepare(self, items: Sequence[str]) -> dict[str, Any]:
        features = self.model.preprocess(list(items))
        return {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}

    @torch.inference_mode()
    def encode(self, prepared: dict[str, Any]) -> EncodedBatch:
        lengths = prepared["attention_mask"].sum(1).to(torch.long)  # host tensor: no device sync
        features = {k: v.to(self.device, non_blocking=True) for k, v in prepared.items()}
        out = self.model(features)
        return EncodedBatch(out["token_embeddings"], lengths, out["sentence_embedding"])

    def describe(self) -> dict[str, Any]:
        modules = [type(m).__name__ for m in self.model]
        return {
            "class": type(self).__name__,
            "model": self.cfg.model,
            "revision": self.cfg.revision,
            "weights": self.weights,
            "layer": "last",
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": {"max_seq_length": self.model.max_seq_length, "modules": modules},
        }
