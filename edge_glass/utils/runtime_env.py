"""Environment defaults every entry point needs before DeepSpeed is imported.

- `DS_ACCELERATOR=cpu` on a machine with no accelerator (no NVIDIA or ROCm driver, no XPU/HPU/NPU
  plug-in): DeepSpeed otherwise probes for one and says "Setting accelerator to CPU" once per
  process it starts.
- `TORCH_EXTENSIONS_DIR` per Python environment: DeepSpeed's JIT-built ops (the CPU shm
  collective) embed the interpreter's paths, so two virtualenvs sharing torch's default cache
  (`~/.cache/torch_extensions/py311_cpu`) rebuild the op in turn, 40-90 s each time.

Only unset variables are filled in; a user's own setting always wins. `edge_glass/__init__.py`
applies them, so importing the package first (every script does) is enough.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def extensions_dir() -> Path:
    """torch extension cache of this Python environment: ~/.cache/edge_glass/torch_extensions/<env>."""
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge_glass" / "torch_extensions" / f"{Path(sys.prefix).name}-{tag}"


ACCELERATOR_PACKAGES = ("intel_extension_for_pytorch", "habana_frameworks", "torch_npu", "torch_mlu", "torch_sdaa")
"""Packages by which DeepSpeed recognises a non-CUDA accelerator (XPU, HPU, NPU, MLU, SDAA)."""


def accelerator_present() -> bool:
    """Whether DeepSpeed may find an accelerator here, judged without importing torch (the
    package's import stays light): an NVIDIA or AMD (ROCm) driver's device files, a visible CUDA
    device list, or an installed accelerator plug-in."""
    import importlib.util

    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        cuda = False
    else:
        cuda = any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))
    return cuda or any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PACKAGES)


def apply_defaults() -> dict[str, str]:
    """Set the defaults that are unset; returns what was set."""
    wanted = {"TORCH_EXTENSIONS_DIR": str(extensions_dir())}
    if not accelerator_present():
        wanted["DS_ACCELERATOR"] = "cpu"
    applied = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(applied)
    return applied
