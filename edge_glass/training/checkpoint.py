"""Checkpoints through DeepSpeed's engine, made crash-safe and resumable exactly.

    runs/<name>/checkpoints/step<N>/      DeepSpeed's files (module, optimizer, scheduler,
                                          client_state), trainable parameters only
        rng_state_<rank>.pt               each rank's torch RNG (DeepSpeed saves none)
        meta.json                         step, ZeRO stage, world size, fingerprints, and the
                                          size and sha256 of every other file
        COMPLETE                          written by rank 0 after every rank has finished

A checkpoint without COMPLETE was interrupted mid-write and is never loaded; resume picks the
newest complete one whose files still match their sizes and hashes (`intact_checkpoint`). One
that does not (a flipped bit, a truncated file, a half-written meta.json) is renamed aside to
`step<N>.corrupt` for inspection, never deleted, and the previous one is used, with a note.
DeepSpeed's own `latest` file is not written (`save_latest=False`), since it would point at a
checkpoint before anyone knows it is complete.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import sha256_file, write_text_atomic

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
    try:
        return json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt}: unreadable {META} ({e}); the checkpoint is corrupt") from None


def file_digests(ckpt: Path, threads: int = 8) -> dict[str, dict]:
    """Size and sha256 of every file of a checkpoint but its meta.json and marker (in parallel:
    hashlib releases the GIL, and a full-tuning checkpoint is gigabytes)."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (META, COMPLETE))
    with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
        hashes = list(pool.map(sha256_file, files))
    return {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "sha256": h} for p, h in zip(files, hashes)}


def problems(ckpt: Path) -> list[str]:
    """What is wrong with a complete checkpoint's files (empty: intact). Checkpoints written
    before meta.json recorded its files are only checked for a readable meta.json."""
    try:
        meta = read_meta(ckpt)
    except UserError as e:
        return [str(e)]
    want = meta.get("files")
    if want is None:
        return []
    out = []
    for rel, spec in want.items():
        path = ckpt / rel
        if not path.is_file():
            out.append(f"{rel} is missing")
        elif path.stat().st_size != spec["bytes"]:
            out.append(f"{rel} is {path.stat().st_size} bytes, {spec['bytes']} were written")
    if not out:
        digests = file_digests(ckpt)
        out = [f"{rel}: sha256 differs from the one written (corrupt)" for rel, spec in want.items()
               if digests.get(rel, {}).get("sha256") != spec["sha256"]]
    return out


def intact_checkpoint(ckpt_root: Path) -> Path | None:
    """Rank 0: the newest complete checkpoint whose files match meta.json; corrupt newer ones
    are renamed aside (`step<N>.corrupt`) with a note, never deleted."""
    for path in reversed(complete_checkpoints(ckpt_root)):
        found = problems(path)
        if not found:
            return path
        aside = path.with_name(f"{path.name}.corrupt")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt{n}")
        path.rename(aside)
        print(f"note: {path} is corrupt ({found[0]}{'; ...' if len(found) > 1 else ''}); moved it to {aside.name} "
              "and resuming from the previous checkpoint", flush=True)
    return None


def save(engine: Any, ckpt_root: Path, step: int, client_state: dict, meta: dict) -> Path:
    """Save on every rank; returns the checkpoint directory once it is complete everywhere."""
    tag = tag_for(step)
    path = ckpt_root / tag
    if D.rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of a crash at this very step; it never got its marker
    D.barrier()
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, path / f"rng_state_{D.rank()}.pt")
        D.barrier()  # every rank's shards and RNG file are on disk
        if D.rank() == 0:
            write_text_atomic(path / META, json.dumps({**meta, "files": file_digests(path)}, indent=1, sort_keys=True))
            write_text_atomic(path / COMPLETE, "")
    except (OSError, RuntimeError) as e:
        raise _save_error(path, ckpt_root, e) from None
    D.barrier()
    return path


def _save_error(path: Path, ckpt_root: Path, error: BaseException) -> BaseException:
    """A failed save as one line when the disk is full (torch's zip writer reports it as
    "unexpected pos ..." with no path): the directory, its free space, what is still intact."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or "unexpected pos" in str(error)
    if not full:
        return error
    free = shutil.disk_usage(ckpt_root).free if ckpt_root.exists() else 0
    previous = [p for p in complete_checkpoints(ckpt_root) if p != path]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    return UserError(f"saving checkpoint {path} failed: no space left on the device ({free / 2**20:,.0f} MiB free in "
                     f"{ckpt_root}); {kept}. Free space (or point experiment.output_dir elsewhere) and resume with --resume auto")


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
