"""Environment defaults the package sets on import (edge_glass/utils/runtime_env.py)."""

from __future__ import annotations

import sys

from edge_glass.utils import runtime_env


def test_defaults_fill_only_unset_variables(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(runtime_env, "accelerator_present", lambda: False)
    applied = runtime_env.apply_defaults()
    assert applied["DS_ACCELERATOR"] == "cpu"
    # One extension cache per Python environment: its name carries this environment's prefix hash.
    assert applied["TORCH_EXTENSIONS_DIR"] == str(runtime_env.extensions_dir())
    assert runtime_env.extensions_dir().name.startswith(sys.prefix.rstrip("/").split("/")[-1] + "-")

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    assert runtime_env.apply_defaults() == {}  # a user's own settings win


def test_a_machine_with_an_accelerator_is_left_to_deepspeed(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(runtime_env, "accelerator_present", lambda: True)
    assert "DS_ACCELERATOR" not in runtime_env.apply_defaults()


def test_the_accelerator_check_sees_rocm_and_plugins(monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(Path, "exists", lambda self: str(self) == "/dev/kfd")
    assert runtime_env.accelerator_present(), "an AMD ROCm driver"
    monkeypatch.setattr(Path, "exists", lambda self: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "habana_frameworks" else real(name))
    assert runtime_env.accelerator_present(), "an HPU plug-in"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not runtime_env.accelerator_present()
