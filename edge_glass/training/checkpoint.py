"""Checkpoints through DeepSpeed's engine, made crash-safe and resumable exactly.

    runs/<name>/checkpoints/step<N>/      DeepSpeed's files (module, optimizer, scheduler,
                                          client_state), trainable parameters only
        rng_state_<rank>.pt               each rank's torch RNG (DeepSpeed saves none)
        meta.json                         step, ZeRO stage, world size, fingerprints
        COMPLETE                          written by rank 0 after every rank has finished

A checkpoint without COMPLETE was interrupted mid-write and is never loaded; resume picks the
newest complete one. DeepSpeed's own `latest` file is not written (`save_latest=False`), since it
would point at a checkpoint before anyone knows it is complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic

COMPLETE = "COMPLETE"
META = "meta.json"
_TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step}"


def step_of(path: Path) -> int | None:
    m = _TAG.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and step_of(p) is not None and (p / COMPLETE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def read_meta(ckpt: Path) -> dict:
    if not (ckpt / COMPLETE).is_file():
        raise UserError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker: it was interrupted while being written)")
    return json.loads((ckpt / META).read_text())


def save(engine: Any, ckpt_root: Path, step: int, client_state: dict, meta: dict) -> Path:
    """Save on every rank; returns the checkpoint directory once it is complete everywhere."""
    tag = tag_for(step)
    path = ckpt_root / tag
    if D.rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of a crash at this very step; it never got its marker
    D.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path / f"rng_state_{D.rank()}.pt")
    D.barrier()  # every rank's shards and RNG file are on disk
    if D.rank() == 0:
        write_text_atomic(path / META, json.dumps(meta, indent=1, sort_keys=True))
        write_text_atomic(path / COMPLETE, "")
    D.barrier()
    return path


def restore_rng(ckpt: Path) -> bool:
    """Restore this rank's RNG; False when the checkpoint has none for it (another world size)."""
    path = ckpt / f"rng_state_{D.rank()}.pt"
    if not path.is_file():
        return False
    rng = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return True


def prune(ckpt_root: Path, keep_last: int, keep: set[str]) -> None:
    """Rank 0: delete complete checkpoints beyond the newest `keep_last` (sparing `keep`, e.g.
    the best one) and incomplete ones older than the newest complete checkpoint."""
    if D.rank() != 0:
        return
    complete = complete_checkpoints(ckpt_root)
    if not complete:
        return
    newest = step_of(complete[-1])
    for p in complete[:-keep_last]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.iterdir():
        s = step_of(p)
        if p.is_dir() and s is not None and s < newest and not (p / COMPLETE).is_file():
            shutil.rmtree(p, ignore_errors=True)
