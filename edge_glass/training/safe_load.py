"""Loading checkpoints without running the code a crafted file could carry.

Checkpoints are pickles. `torch.load(weights_only=True)` unpickles only tensors, containers and
an explicit allow-list of classes; DeepSpeed's engine (`TorchCheckpointEngine.load`), its
`zero_to_fp32` consolidation and `ds_to_universal` all call `torch.load(weights_only=False)`, so a
`__reduce__` payload in a checkpoint someone hands you runs on `--resume`, `--weights-only`,
`train.init_from`, `evaluate.py --run`, `export.py` and in notebooks.

`safe_torch_load()` makes every `torch.load` inside it, DeepSpeed's included, a weights-only
load that also accepts the three DeepSpeed classes its own checkpoints reference (the optimizer
file holds a LossScaler, a ZeroStageEnum and fragment addresses; measured over ZeRO-1/2/3,
fp32/bf16, CPU offload and universal checkpoints). A file that references anything else is
refused with one line. Replacing `torch.load` for the duration of the call is what reaches every
DeepSpeed path at once (the engine's checkpoint engine, its universal loader, zero_to_fp32 and
ds_to_universal each call `torch.load` directly); a checkpoint engine of our own would cover only
the first.
"""

from __future__ import annotations

import pickle
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

from edge_glass.utils.errors import UserError

_lock = threading.RLock()


class UnsafeCheckpoint(UserError):
    """A checkpoint file whose pickle references code outside the allow-list."""


def deepspeed_globals() -> list:
    """The classes DeepSpeed's checkpoints pickle (imported lazily: deepspeed is slow to import)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def safe_torch_load() -> Iterator[None]:
    """Within this block, `torch.load` is weights-only with DeepSpeed's classes allowed."""
    allowed = deepspeed_globals()
    original = torch.load

    def guarded(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
        extra = {"mmap": mmap} if mmap is not None else {}
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, map_location=map_location, weights_only=True, **extra, **kwargs)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph; the line that matters names the global it refused.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)
            detail = detail.split(" If you ")[0].split(". Please ")[0]
            raise UnsafeCheckpoint(
                f"{f}: refused to load: the file references code, not just tensors ({detail}). Checkpoints run "
                "whatever code they reference when unpickled; load only files you made or trust"
            ) from None

    with _lock:  # one patch at a time; nested uses see the guard already in place
        if getattr(torch.load, "_edge_glass_guard", False):
            yield
            return
        guarded._edge_glass_guard = True
        torch.load = guarded
        try:
            yield
        finally:
            torch.load = original
