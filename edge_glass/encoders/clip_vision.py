"""Frozen CLIP vision tower: patch tokens from a chosen hidden layer, and the projected vector."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from edge_glass.config import VisionEncoderConfig, check_model_dir
from edge_glass.encoders.base import EncodedBatch, FrozenEncoder, check_layer, weights_fingerprint
from edge_glass.encoders.images import to_rgb


class ClipVisionEncoder(FrozenEncoder):
    modality = "vision"

    def __init__(self, cfg: VisionEncoderConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        check_model_dir(cfg.model, "encoders.vision.model")
        self.cfg = cfg
        self.processor = AutoImageProcessor.from_pretrained(cfg.model, revision=cfg.revision)
        # WithProjection loads the vision tower of a full CLIPModel checkpoint too (the text tower
        # is skipped), and gives the projected embedding that CLIP's contrastive space uses.
        model = CLIPVisionModelWithProjection.from_pretrained(cfg.model, revision=cfg.revision, dtype="auto")
        self.weights = weights_fingerprint(model)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        native = self.model.config.image_size
        self.image_size = cfg.image_size or native
        if cfg.image_size is not None:
            self.processor.size = {"shortest_edge": cfg.image_size}
            self.processor.crop_size = {"height": cfg.image_size, "width": cfg.image_size}
        # Another resolution than the one CLIP was trained at needs interpolated position
        # embeddings (what LLaVA-style 336-px variants do); same size keeps the exact model.
        self.interpolate = self.image_size != native
        check_layer(cfg.layer, self.model.config.num_hidden_layers, "encoders.vision.layer", cfg.model)

    @property
    def token_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.config.projection_dim

    def prepare(self, items: Sequence[Image.Image]) -> dict[str, Any]:
        pixels = self.processor(images=[to_rgb(im) for im in items], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}

    @torch.inference_mode()
    def encode(self, prepared: dict[str, Any]) -> EncodedBatch:
        pixels = prepared["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        out = self.model(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=self.interpolate)
        tokens = out.hidden_states[self.cfg.layer]
        if not self.cfg.keep_cls:
            tokens = tokens[:, 1:]
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        return EncodedBatch(tokens.float().cpu(), lengths, out.image_embeds.float().cpu())

    def describe(self) -> dict[str, Any]:
        p = self.processor
        return {
            "class": type(self).__name__,
            "model": self.cfg.model,
            "revision": self.cfg.revision,
            "weights": self.weights,
            "layer": self.cfg.layer,
            "keep_cls": self.cfg.keep_cls,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": {
                "image_size": self.image_size,
                "interpolate_pos_encoding": self.interpolate,
                "resize": _plain(p.size),
                "crop_size": _plain(p.crop_size),
                "image_mean": list(p.image_mean),
                "image_std": list(p.image_std),
                "alpha": "composited on white",
            },
        }


def _plain(size) -> dict | int | None:
    """transformers 5 keeps sizes in a SizeDict; the manifest needs plain JSON."""
    if size is None or isinstance(size, int):
        return size
    return {k: v for k, v in dict(size).items() if v is not None}
