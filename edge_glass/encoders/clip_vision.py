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
        layers = self.model.config.num_hidden_layers
        check_layer(cfg.layer, layers, "encoders.vision.layer", cfg.model)
        # The stored layer is captured by a hook as the forward passes it, rather than asking for
        # every hidden state: those would all stay alive until the pooled output is computed
        # (25 x [B, 577, 1024] for ViT-L). The pooled (projected CLS) vector needs the top layer,
        # so every layer runs whatever `layer` is.
        index = cfg.layer % (layers + 1)  # hidden_states[0] is the embeddings, [i] layer i-1's output
        vm = self.model.vision_model
        self._captured: list[torch.Tensor] = []
        source = vm.pre_layrnorm if index == 0 else vm.encoder.layers[index - 1]
        source.register_forward_hook(lambda module, args, output: self._captured.append(output))

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
        self._captured.clear()
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate)
        tokens = self._captured.pop()
        cls, patches = tokens[:, :1], tokens[:, 1:]
        if self.cfg.pool > 1:
            patches = pool_grid(patches, self.cfg.pool)
        tokens = torch.cat([cls, patches], dim=1) if self.cfg.keep_cls else patches
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        return EncodedBatch(tokens, lengths, out.image_embeds)

    def describe(self) -> dict[str, Any]:
        p = self.processor
        return {
            "class": type(self).__name__,
            "model": self.cfg.model,
            "revision": self.cfg.revision,
            "weights": self.weights,
            "layer": self.cfg.layer,
            "keep_cls": self.cfg.keep_cls,
            "pool": self.cfg.pool,
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


def pool_grid(patches: torch.Tensor, pool: int) -> torch.Tensor:
    """[B, g*g, D] patch tokens of a square grid -> [B, ceil(g/pool)^2, D], each the mean of a
    pool x pool window (edge windows of an odd grid average the patches they cover)."""
    b, n, d = patches.shape
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"encoders.vision.pool: {n} patch tokens are not a square grid")
    grid = patches.reshape(b, g, g, d).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(grid, pool, stride=pool, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


def _plain(size) -> dict | int | None:
    """transformers 5 keeps sizes in a SizeDict; the manifest needs plain JSON."""
    if size is None or isinstance(size, int):
        return size
    return {k: v for k, v in dict(size).items() if v is not None}
