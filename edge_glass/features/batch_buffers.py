"""The arrays a batch is gathered into: allocated once and reused, page-locked for a GPU.

Allocating a fresh batch per step costs more than it looks at the sizes a GPU box feeds: a
micro-batch of 256 ViT-L/14-336 samples is 300 MB of float16 tokens, and fresh pages are
zero-filled by the kernel on first touch (a second pass over the memory), plus, for the GPU,
page-locking it (or a second copy into page-locked memory, which the previous loader made).
A `BatchBuffers` keeps one growable array per field; the loader owns a small ring of them and
refills a slot only after the batch that last used it has been handed back (loader.py).

Host (unpinned) buffers sit on transparent huge pages where Linux offers them (`madvise`, the
usual setting). The reader threads fill them with `pread`, and the kernel's copy into ordinary
4 KiB pages ran at half the speed of the copy into 2 MiB pages on the project's CPU box
(`benchmarks/copy_paths.py`: 8.5 vs 15.9 GB/s with two threads, against 19.6 for torch's
in-memory gather). Page-locked buffers for a GPU come from the CUDA allocator as before.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch

_HUGE_PAGE = 2 << 20

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
        # The last views made of each buffer: most batches have the shapes of the one before,
        # and a dict lookup is cheaper than making the torch and numpy views again, which the
        # reader threads do holding the GIL.
        self._views: dict[str, tuple[tuple, np.dtype, np.ndarray, torch.Tensor]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, torch.Tensor]:
        """(numpy view to write into, torch view to hand out) of shape `shape`; contents undefined."""
        last = self._views.get(name)
        if last is not None and last[0] == shape and last[1] == dtype:
            return last[2], last[3]
        dtype = np.dtype(dtype)
        n = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.dtype != _TORCH_DTYPE[dtype]:
            # Grow with headroom: variable-length fields (audio, text) reach their longest batch
            # over the first steps, and each growth is a fresh allocation.
            size = max(n, int(1.25 * flat.numel()) if flat is not None and flat.dtype == _TORCH_DTYPE[dtype] else n, 1)
            torch_dtype = _TORCH_DTYPE[dtype]
            flat = torch.empty(size, dtype=torch_dtype, pin_memory=True) if self.pin_memory else host_buffer(size, torch_dtype)
            self._flat[name] = flat
        view = flat[:n].view(shape)
        self._views[name] = (tuple(shape), dtype, view.numpy(), view)
        return self._views[name][2], view

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())


def host_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D tensor on transparent huge pages where the OS offers them, else `torch.empty`.

    An anonymous private mapping, 2 MiB-aligned, advised MADV_HUGEPAGE; the tensor holds the
    mapping (torch.frombuffer keeps a reference), so it is unmapped when the last view goes.
    Hand-written because torch's CPU allocator uses huge pages only when the process starts
    with THP_MEM_ALLOC_ENABLE=1, for every allocation alike.
    """
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < _HUGE_PAGE:
        return torch.empty(numel, dtype=dtype)
    length = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
    try:
        region = mmap.mmap(-1, length + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(numel, dtype=dtype)
    start = (-np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data) % _HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, start, length)
    except OSError:  # THP off ("never") or not in this kernel: ordinary pages, still correct
        pass
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=start).view(dtype)
