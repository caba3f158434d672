#!/usr/bin/env python
"""FeatureLoader throughput per backend, against bare reads of the same bytes, in one run.

Run with:
    python benchmarks/loader.py                 # ~8k samples, ~1 min on 2 cores
    python benchmarks/loader.py --samples 20000 --token_len 50 --dim 384

Baselines, measured in the same process on the same store:
  * hdf5 bare: plain h5py slices of `batch` consecutive samples into numpy, no shuffle, no
    padding, no torch: the most a reader of this file layout can do in Python.
  * webdataset bare: the `webdataset` library streaming the tars and parsing each .npy member.
The loader is measured as the trainer runs it (a prefetch thread keeps batches ready while the
model step runs) and without that thread: with nothing to overlap, the thread only competes for
the GIL, so the second line is the loader's own cost.
The store is synthetic (random fp16 features of a tri-modal shape); every file is read once
before timing, so the numbers are page-cache reads, which is what a training epoch after the
first sees.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import webdataset as wds

from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.features.hdf5_shard import write_hdf5_shard
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.manifest import FORMAT_VERSION
from edge_glass.features.store import open_store
from edge_glass.features.wds_shard import write_wds_shard


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def make_store(root: Path, samples: int, shard_size: int, token_len: int, dim: int, seed: int = 0) -> Path:
    """A store with vision (fixed-length), audio (fixed) and text (variable-length) features."""
    rng = np.random.default_rng(seed)
    split = root / "train"
    split.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, samples, shard_size)):
        n = min(shard_size, samples - start)
        mods = {}
        for m, lengths in (
            ("vision", np.full(n, token_len)),
            ("audio", np.full(n, token_len)),
            ("text", rng.integers(8, 24, size=n)),
        ):
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            mods[m] = ModalityArrays(
                rng.standard_normal((int(offsets[-1]), dim)).astype(np.float16), offsets,
                rng.standard_normal((n, dim)).astype(np.float16),
            )
        keys = [f"train-{start + i:08d}" for i in range(n)]
        block = FeatureBlock(keys, [f"caption {start + i}" for i in range(n)], ['{"source": "bench"}'] * n, mods)
        name = f"shard-{s:06d}"
        write_hdf5_shard(split / f"{name}.h5", block, {"format_version": FORMAT_VERSION})
        write_wds_shard(split / f"{name}.tar", block)
        files = {fmt: {"file": f"{name}{ext}", "sha256": "", "bytes": (split / f"{name}{ext}").stat().st_size}
                 for fmt, ext in (("hdf5", ".h5"), ("webdataset", ".tar"))}
        shards.append({"name": name, "raw_shard": "", "num_samples": n, "files": files})
    fields = {f"{m}.{k}": {"dim": dim, "dtype": "float16"} for m in ("vision", "audio", "text") for k in ("tokens", "pooled")}
    zeros = {"count": 1, "mean": [0.0] * dim, "std": [1.0] * dim}
    manifest = {
        "format_version": FORMAT_VERSION, "split": "train", "fingerprint": "bench", "store_dtype": "float16",
        "encoders": {}, "formats": ["hdf5", "webdataset"], "fields": fields, "num_samples": samples,
        "shards": shards, "source": {}, "stats": {f: zeros for f in fields},
    }
    (split / "manifest.json").write_text(json.dumps(manifest))
    return root


def warm(paths) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def bare_hdf5(split_dir: Path, batch: int) -> int:
    n = 0
    for path in sorted(split_dir.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            total = f["keys"].shape[0]
            for a in range(0, total, batch):
                b = min(a + batch, total)
                for m in ("vision", "audio", "text"):
                    off = f[m]["offsets"][a : b + 1]
                    f[m]["tokens"][off[0] : off[-1]]
                    f[m]["pooled"][a:b]
                f["keys"][a:b]
                n += b - a
    return n


def bare_wds(split_dir: Path) -> int:
    n = 0
    urls = [str(p) for p in sorted(split_dir.glob("shard-*.tar"))]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None):
        for k, v in sample.items():
            if k.endswith(".npy"):
                np.load(io.BytesIO(v), allow_pickle=False)
        n += 1
    return n


def through_loader(store: Path, backend: str, batch: int, prefetch_batches: int = 2) -> int:
    loader = FeatureLoader(open_store(store, "train", backend), batch, seed=0, drop_last=True, prefetch_batches=prefetch_batches)
    n = 0
    for b in loader:
        n += b["vision"]["tokens"].shape[0]
    return n


def timed(fn, repeats: int) -> float:
    """Best samples/s over `repeats` runs (the least disturbed by the other core's load)."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--token_len", type=int, default=50)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="eg-loader-bench-"))
    try:
        make_store(root, args.samples, args.shard_size, args.token_len, args.dim)
        split = root / "train"
        warm(sorted(split.glob("shard-*")))
        print(f"machine: {machine()}")
        print(f"store: {args.samples} samples, vision/audio tokens [{args.token_len}, {args.dim}], text tokens [8..23, {args.dim}], "
              f"fp16, shards of {args.shard_size}; batch {args.batch}; best of {args.repeats}")
        h_bare = timed(lambda: bare_hdf5(split, args.batch), args.repeats)
        h_loader = timed(lambda: through_loader(root, "hdf5", args.batch), args.repeats)
        h_loader0 = timed(lambda: through_loader(root, "hdf5", args.batch, prefetch_batches=0), args.repeats)
        w_bare = timed(lambda: bare_wds(split), args.repeats)
        w_loader = timed(lambda: through_loader(root, "webdataset", args.batch), args.repeats)
        print(f"{'path':<42}{'samples/s':>12}{'ratio':>8}")
        print(f"{'hdf5 bare h5py slices (baseline)':<42}{h_bare:>12,.0f}{1.0:>8.2f}")
        print(f"{'hdf5 FeatureLoader (shuffled, padded)':<42}{h_loader:>12,.0f}{h_loader / h_bare:>8.2f}")
        print(f"{'  same, no prefetch thread':<42}{h_loader0:>12,.0f}{h_loader0 / h_bare:>8.2f}")
        print(f"{'webdataset library + np.load (baseline)':<42}{w_bare:>12,.0f}{1.0:>8.2f}")
        print(f"{'webdataset FeatureLoader (shuffled, padded)':<42}{w_loader:>12,.0f}{w_loader / w_bare:>8.2f}")
        print(f"RATIO hdf5_loader/hdf5_bare={h_loader / h_bare:.2f} (no prefetch thread {h_loader0 / h_bare:.2f}) "
              f"wds_loader/wds_bare={w_loader / w_bare:.2f} "
              f"wds_loader/hdf5_bare={w_loader / h_bare:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
