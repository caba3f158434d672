"""The common interface of the frozen encoders that fill the feature store.

An encoder turns a batch of raw inputs (PIL images, mono waveforms, captions) into, per sample,
a token sequence of its true length and one pooled vector. It is split in two halves so the
CPU half can run in DataLoader workers while the model runs in the main process:

    prepared = encoder.prepare(raw_items)      # decode/resize/mel/tokenise: CPU, picklable
    out = encoder.encode(prepared)             # the frozen model: inference mode, on device

Only the offline extraction stage imports this package; training reads the store.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from edge_glass.utils.errors import UserError



@dataclass
class EncodedBatch:
    """Encoder outputs for one batch. The arrays stay on the encoder's device in its compute
    dtype: extraction converts (or quantises) them there and copies only what it stores to the
    host, once (extract.py). The lengths are known from preprocessing, on the host, so cutting
    the padding off never waits for the device."""

    tokens: torch.Tensor
    """[B, T, D] token sequence; what lies beyond each sample's length is undefined."""
    lengths: torch.Tensor
    """[B] true number of tokens per sample (int64, CPU)."""
    pooled: torch.Tensor
    """[B, P] pooled (or projected) vector per sample."""


class FrozenEncoder(ABC):
    """A frozen, inference-only encoder for one modality."""

    modality: str
    """`vision`, `audio` or `text`: the raw field it reads and the store group it writes."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def prepare(self, items: Sequence[Any]) -> dict[str, Any]:
        """CPU preprocessing of raw items into model inputs (tensors)."""

    @abstractmethod
    def encode(self, prepared: dict[str, Any]) -> EncodedBatch:
        """Run the frozen model on prepared inputs."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the manifest records about this encoder: id, weights hash, layer, preprocessing, dims."""

    @property
    @abstractmethod
    def token_dim(self) -> int:
        """Width D of the stored token sequence."""

    @property
    @abstractmethod
    def pooled_dim(self) -> int:
        """Width P of the stored pooled vector."""


def resolve_device(device: str) -> torch.device:
    """`auto` picks the accelerator when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs (the encoders were trained in half precision) and float32 on CPU,
    where bf16 matmuls are slow and buy nothing for a one-off pass."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_layer(layer: int, num_layers: int, where: str, model: str) -> None:
    """Hidden-state indices run from -(num_layers + 1) (the embeddings) to num_layers."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UserError(f"{where}: {layer} is outside [-{num_layers + 1}, {num_layers}] for {model}")


def weights_fingerprint(model: Any) -> str:
    """A hash that changes whenever the weights do.

    Hashing the loaded parameters (rather than files) gives the same answer for a hub id and a
    local copy of it, and for safetensors vs pickle files of the same weights. It costs one pass
    over the parameters, which is nothing next to extracting a dataset.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"sha256:{h.hexdigest()}"


def masked_mean(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the first `lengths[i]` tokens of each sample."""
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    summed = (tokens * mask[..., None]).sum(1)
    return summed / lengths.clamp(min=1)[:, None].to(tokens.dtype)
