"""Frozen Whisper encoder: frames trimmed to the clip's true length, pooled by a masked mean."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch

from edge_glass.config import AudioEncoderConfig, check_model_dir
from edge_glass.encoders.audio import prepare_waveform
from edge_glass.encoders.base import EncodedBatch, FrozenEncoder, check_layer, masked_mean, weights_fingerprint
from edge_glass.utils.errors import UserError

# Whisper's log-mel front end: 10 ms hop, and the encoder's stride-2 conv halves the frames.
_HOP_SECONDS = 0.01
_CONV_STRIDE = 2


class WhisperAudioEncoder(FrozenEncoder):
    modality = "audio"

    def __init__(self, cfg: AudioEncoderConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        from transformers import AutoFeatureExtractor, WhisperModel

        check_model_dir(cfg.model, "encoders.audio.model")
        self.cfg = cfg
        self.extractor = AutoFeatureExtractor.from_pretrained(cfg.model, revision=cfg.revision)
        self.rate = self.extractor.sampling_rate
        model = WhisperModel.from_pretrained(cfg.model, revision=cfg.revision, dtype="auto")
        self.weights = weights_fingerprint(model.encoder)
        encoder = model.get_encoder()
        native_positions = encoder.config.max_source_positions
        native_seconds = native_positions * _CONV_STRIDE * _HOP_SECONDS
        positions = int(round(cfg.audio_seconds / (_HOP_SECONDS * _CONV_STRIDE)))
        if positions > native_positions:
            raise UserError(
                f"encoders.audio.audio_seconds: {cfg.audio_seconds} s exceeds the {native_seconds:g} s window of {cfg.model}"
            )
        if positions < native_positions:
            # A shorter window than the model's (30 s for real Whisper) keeps only the first
            # positional embeddings, so a 1 s clip costs 1 s of compute instead of 30 s of
            # padding. The features then differ from 30-s padded ones, which is why the window
            # is part of the manifest's fingerprint.
            encoder.embed_positions = torch.nn.Embedding.from_pretrained(
                encoder.embed_positions.weight[:positions].clone(), freeze=True
            )
            encoder.config = copy.deepcopy(encoder.config)
            encoder.config.max_source_positions = positions
            encoder.max_source_positions = positions
        self.window_positions = positions
        self.window_samples = positions * _CONV_STRIDE * int(round(_HOP_SECONDS * self.rate))
        layers = encoder.config.encoder_layers
        check_layer(cfg.layer, layers, "encoders.audio.layer", cfg.model)
        index = cfg.layer % (layers + 1)
        if index < layers:
            # hidden_states[i] (i < layers) is the output of layer i-1 before the final layer
            # norm: run only those layers, and no norm. The top layers would be computed for
            # nothing (the pooled vector is the mean of the stored frames).
            encoder.layers = encoder.layers[:index]
            encoder.layer_norm = torch.nn.Identity()
        self.encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        del model  # the decoder is never used; drop it before extraction allocates batches

    @property
    def token_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def pooled_dim(self) -> int:
        return self.encoder.config.d_model

    def prepare(self, items: Sequence[tuple[np.ndarray, int]]) -> dict[str, Any]:
        """`items` are (waveform, sample_rate) pairs in any layout soundfile returns."""
        waves = [prepare_waveform(a, sr, self.rate, self.window_samples / self.rate) for a, sr in items]
        feats = self.extractor(
            waves,
            sampling_rate=self.rate,
            return_tensors="pt",
            padding="max_length",
            max_length=self.window_samples,
            truncation=True,
            return_attention_mask=True,
        )
        mel_frames = feats["attention_mask"].sum(1)
        # ceil(mel / 2): the stride-2 conv keeps a frame for every started pair of mel frames.
        lengths = torch.div(mel_frames + _CONV_STRIDE - 1, _CONV_STRIDE, rounding_mode="floor")
        return {"input_features": feats["input_features"], "lengths": lengths.clamp(min=1)}

    @torch.inference_mode()
    def encode(self, prepared: dict[str, Any]) -> EncodedBatch:
        feats = prepared["input_features"].to(self.device, self.dtype, non_blocking=True)
        tokens = self.encoder(feats).last_hidden_state
        lengths = prepared["lengths"].to(torch.long)
        # The mean in float32: a bf16 sum over up to 1500 frames would lose the low bits.
        pooled = masked_mean(tokens.float(), lengths.to(tokens.device))
        return EncodedBatch(tokens, lengths, pooled)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "model": self.cfg.model,
            "revision": self.cfg.revision,
            "weights": self.weights,
            "layer": self.cfg.layer,
            "compute_dtype": str(self.dtype).removeprefix("torch."),
            "preprocessing": {
                "sampling_rate": self.rate,
                "window_seconds": self.window_samples / self.rate,
                "num_mel_bins": self.extractor.feature_size,
                "mono": "mean of channels",
                "resampler": "soxr HQ",
                "pooling": "masked mean over true frames",
            },
        }
