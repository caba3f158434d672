"""A DeepSpeed JSON from `ds_configs/` with its "auto" fields filled from the experiment config.

DeepSpeed itself does not understand "auto" (that is the HF Trainer's convention); filling them
here is what lets a user swap `zero2.json` for `zero3.json` without touching anything else. A
field the JSON sets to a literal value is the user's explicit choice and is kept.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from edge_glass.config import Config
from edge_glass.utils.errors import UserError
from edge_glass.utils import shipped


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` is bf16 on GPUs that support it and fp32 elsewhere (CPU bf16 is slow, and its
    rounding would make CPU runs differ from the fp32 reference losses)."""
    if precision != "auto":
        return precision
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_ds_config(cfg: Config, path: str | Path, world_size: int, precision: str, run_dir: Path) -> dict:
    """Read `path`, fill every "auto", and add the monitor and checkpoint settings."""
    path = shipped.resolve(path)  # ds_configs/... of the package when the working directory has none
    if not path.is_file():
        raise UserError(f"train.deepspeed: file not found: {path} (the shipped ones are in ds_configs/)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    ds = copy.deepcopy(ds)
    mbs, gas = cfg.data.micro_batch_size, cfg.train.grad_accum
    auto = {
        ("train_micro_batch_size_per_gpu",): mbs,
        ("gradient_accumulation_steps",): gas,
        ("train_batch_size",): mbs * gas * world_size,
        ("gradient_clipping",): cfg.train.grad_clip,
        ("optimizer", "params", "lr"): cfg.optim.lr,
        ("optimizer", "params", "betas"): list(cfg.optim.betas),
        ("optimizer", "params", "eps"): cfg.optim.eps,
        ("optimizer", "params", "weight_decay"): cfg.optim.weight_decay,
        ("bf16", "enabled"): precision == "bf16",
        ("fp16", "enabled"): precision == "fp16",
    }
    for keys, value in auto.items():
        node = ds
        for k in keys[:-1]:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and node.get(keys[-1]) == "auto":
            node[keys[-1]] = value
    leftover = _find_auto(ds)
    if leftover:
        raise UserError(f"{path}: no value for \"auto\" at {leftover[0]} (Edge Glass fills: "
                        f"{', '.join('.'.join(k) for k in auto)})")
    if ds.get("train_batch_size") not in (None, mbs * gas * world_size):
        raise UserError(
            f"{path}: train_batch_size {ds['train_batch_size']} != micro batch {mbs} x grad_accum {gas} x {world_size} ranks; "
            'set it to "auto"'
        )
    ds.setdefault("steps_per_print", 10**9)  # our own progress bar and metrics.jsonl report steps
    return ds


def _find_auto(node, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
