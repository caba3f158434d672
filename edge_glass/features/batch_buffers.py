"""The arrays a batch is gathered into: allocated once and reused, page-locked for a GPU.

Allocating a fresh batch per step costs more than it looks at the sizes a GPU box feeds: a
micro-batch of 256 ViT-L/14-336 samples is 300 MB of float16 tokens, and fresh pages are
zero-filled by the kernel on first touch (a second pass over the memory), plus, for the GPU,
page-locking it (or a second copy into page-locked memory, which the previous loader made).
A `BatchBuffers` keeps one growable array per field; the loader owns a small ring of them and
refills a slot only after the batch that last used it has been handed back (loader.py).
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPE = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.int64): torch.int64,
}


class BatchBuffers:
    """Named flat buffers, viewed at each batch's shape (contiguous: the first n elements)."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._flat: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """(numpy view to write into, torch view to hand out) of shape `shape`; contents undefined."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64))
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.dtype != _TORCH_DTYPE[dtype]:
            # Grow with headroom: variable-length fields (audio, text) reach their longest batch
            # over the first steps, and each growth is a fresh allocation.
            size = max(n, int(1.25 * flat.numel()) if flat is not None and flat.dtype == _TORCH_DTYPE[dtype] else n, 1)
            flat = torch.empty(size, dtype=_TORCH_DTYPE[dtype], pin_memory=self.pin_memory)
            self._flat[name] = flat
        view = flat[:n].view(shape)
        return view.numpy(), view

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())
