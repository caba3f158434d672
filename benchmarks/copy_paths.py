#!/usr/bin/env python
"""How fast reader threads can move stored token bytes into a batch buffer, by copy path.

Run with:
    python benchmarks/copy_paths.py            # ViT-L/14-336 shapes, ~2 min on 2 cores

The question behind it: the FeatureLoader delivers ~0.7-0.8 of the machine's gather limit idle
(benchmarks/loader.py), and the copy itself is most of its time. This measures the copy alone,
outside the loader, on the same store layout (HDF5 shards of contiguous [576, 1024] float16
token rows, 1.18 MB a sample, page cache warm), batches of 64 random samples, with 1 and 2
threads, idle and with one busy process per core:

    limit          torch.index_select of the same rows from memory (the loader benchmark's limit)
    limit_huge     the same into a buffer on 2 MiB transparent huge pages (madvise)
    pread          os.preadv of each sample's bytes into an ordinary buffer
    pread_huge     the same into a huge-page buffer (what the loader's host buffers are)
    map            a read-only MAP_POPULATE map of each sample's bytes, numpy copy, unmap

Every path copies the same bytes; GB/s of token bytes delivered.
"""

from __future__ import annotations

import argparse
import mmap
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from loader import SHAPES, CompetingLoad, machine, make_store, run_threads, warm



def huge_buffer(nbytes: int) -> np.ndarray:
    """A uint8 buffer on transparent huge pages: the loader's own host buffers."""
    from edge_glass.features.batch_buffers import host_buffer

    return host_buffer(nbytes, torch.uint8).numpy()


def sample_ranges(root: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """Open descriptors of the shards and each sample's (shard, byte offset) of its vision tokens."""
    import os

    import h5py

    fds, where = [], []
    for k, path in enumerate(sorted((root / "train").glob("shard-*.h5"))):
        with h5py.File(path, "r") as f:
            tokens, offsets = f["vision/tokens"], f["vision/offsets"][:]
            base, row = tokens.id.get_offset(), tokens.shape[1] * tokens.dtype.itemsize
        fds.append(os.open(path, os.O_RDONLY))
        where += [(k, base + int(first) * row) for first in offsets[:-1]]
    return fds, where


def copy_rate(path: str, fds, where, batches, sample_bytes: int, threads: int, limit_src=None) -> float:
    import os

    page = mmap.PAGESIZE
    outs = [huge_buffer(len(batches[0]) * sample_bytes) if path.endswith("_huge")
            else np.zeros(len(batches[0]) * sample_bytes, np.uint8) for _ in range(threads)]
    for out in outs:
        out[:] = 0  # first touch outside the timing

    def work(t: int) -> None:
        out = outs[t]
        for b in batches[t::threads]:
            if path.startswith("limit"):
                torch.index_select(limit_src, 0, torch.from_numpy(b), out=torch.from_numpy(out).view(len(b), -1))
                continue
            for j, i in enumerate(b.tolist()):
                shard, offset = where[i]
                dst = out[j * sample_bytes : (j + 1) * sample_bytes]
                if path == "map":
                    base = offset - offset % page
                    m = mmap.mmap(fds[shard], sample_bytes + offset - base, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  prot=mmap.PROT_READ, offset=base)
                    np.copyto(dst, np.frombuffer(m, np.uint8, count=sample_bytes, offset=offset - base))
                    m.close()
                else:
                    os.preadv(fds[shard], [dst], offset)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one copy per Python thread, as the loader's readers
    try:
        return len(batches) * len(batches[0]) * sample_bytes / run_threads(work, threads)
    finally:
        torch.set_num_threads(previous)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="rounds; medians are printed")
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="eg-copy-paths-", dir=args.tmp))
    try:
        make_store(root, args.samples, 256, SHAPES["vitl"])
        warm(sorted((root / "train").glob("shard-*.h5")))
        fds, where = sample_ranges(root)
        sample_bytes = 576 * 1024 * 2
        rng = np.random.default_rng(0)
        batches = [rng.permutation(args.samples)[: args.batch] for _ in range(args.samples // args.batch)]
        # The limit's source: the same token bytes in memory, one row per sample.
        src = np.empty((args.samples, sample_bytes), np.uint8)
        import os

        for i, (shard, offset) in enumerate(where):
            os.preadv(fds[shard], [src[i]], offset)
        limit_src = torch.from_numpy(src)
        print(f"machine: {machine()}")
        print(f"{args.samples} samples of [576, 1024] float16 in shards of 256, batches of {args.batch}, "
              f"medians of {args.repeats} rounds, GB/s of token bytes")
        paths = ("limit", "limit_huge", "pread", "pread_huge", "map")
        print(f"{'condition':<10}{'threads':>8}" + "".join(f"{p:>12}" for p in paths))
        for condition in ("idle", "loaded"):
            load = CompetingLoad() if condition == "loaded" else None
            if load:
                load.__enter__()
            try:
                for threads in (1, 2):
                    rates = {q: [] for q in paths}
                    for _ in range(args.repeats):  # interleaved, so a slow minute hits every path
                        for q in paths:
                            rates[q].append(copy_rate(q, fds, where, batches, sample_bytes, threads, limit_src))
                    print(f"{condition:<10}{threads:>8}" + "".join(f"{np.median(rates[q]) / 1e9:>12.2f}" for q in paths))
            finally:
                if load:
                    load.__exit__(None, None, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
