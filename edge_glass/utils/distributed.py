"""Process-group plumbing for scripts that may run alone, under torchrun, or under `deepspeed`.

Both launchers export RANK/WORLD_SIZE/MASTER_ADDR; a plain `python script.py` exports nothing
and runs as world size 1 without any process group (DeepSpeed's own init would otherwise fall
back to MPI discovery and fail for want of mpi4py).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher started this process as one rank of several (or of one)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_process_group() -> bool:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs); False when not launched."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_object(value):
    """Rank 0's `value` on every rank (a picklable Python object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank (picklable Python objects)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def teardown(clean: bool = True) -> None:
    """Barrier, then destroy the group: without it 2 of 36 two-rank CPU runs aborted at exit
    with 'terminate called without an active exception'.

    After an error (`clean=False`) there is no barrier: the other ranks may be inside another
    collective, and a barrier would pair with it and hang instead of letting this rank exit
    (the launcher then stops the others)."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of `x` concatenated in rank order; ranks may hold different row counts.

    Evaluation shards the split without dropping samples, so the last rank can be short; the
    collective needs equal shapes, hence the pad-then-trim.
    """
    if world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])
