#!/usr/bin/env python
"""The data path at the sizes stores have: resources and throughput from 10k to 1M samples, bytes
at ViT-L/14-336 shapes, and what compact token storage costs in retrieval.

Run with:
    python benchmarks/scale.py                                   # every section, ~20 min on 2 cores
    python benchmarks/scale.py --sections samples --sizes 10000 100000 1000000
    python benchmarks/scale.py --sections bytes --gb 2 8 24      # ViT-L shapes; 24 GB > this box's memory
    python benchmarks/scale.py --sections quant                  # CPU twins: float16 / int8 / int4 / pool 2

Sections:
  samples  Stores of 10k, 100k and 1M samples of small random features (8 x 64 patch tokens, 4-12
           x 64 caption tokens, pooled 64; ~2.4 KB a sample) in shards of 100 (`--shard_size`), so
           1M fits in a few GB and every size has more shards than data.max_open_shards (100 to
           10,000 files): what must stay flat is what the loader holds, not what the store has. Each size is read by a fresh process (so its numbers are its own) as the trainer
           reads it (shuffled, 2 modalities, reader threads, reused buffers) for `--seconds`:
           store open time, first-batch latency, samples/s, GB/s, open files and resident memory
           (anonymous and file-backed, peak while reading), then the same with one busy process
           per core competing for the CPU. Flat means within 10 % from the smallest to the largest.
  bytes    Stores of ViT-L/14-336 patch tokens ([576, 1024] float16, 1.18 MB a sample) and
           mpnet-sized caption tokens, of the given sizes in GB (the largest beyond the page cache
           this box has, so it is read from disk): GB/s, open files, memory.
  quant    The CPU twins' store (8,000 synthetic samples, tiny CLIP, random Whisper, real MiniLM)
           stored as float16, int8, int4, and with 2x2 pooled patches (float16 and int8): bytes a
           sample (tokens alone and the whole store) and the test split's R@1 of the tri-modal
           align twin trained on each, against float16.
Every store is written to a temporary directory (`--tmp`) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import CompetingLoad, machine, make_store, warm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = {"vision": (8, 64, 64), "text": ((4, 13), 64, 64)}
VITL = {"vision": (576, 1024, 768), "text": ((8, 33), 768, 768)}


# --- one measurement, in a process of its own -----------------------------------------------------


def _status() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}


def measure(store: Path, batch: int, seconds: float, max_open_shards: int) -> dict:
    """Open the store, read it as training does for `seconds`; resources sampled as it runs."""
    from edge_glass.features.loader import FeatureLoader
    from edge_glass.features.store import open_store

    peak = {"fds": 0, "RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["fds"] = max(peak["fds"], len(os.listdir("/proc/self/fd")))
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.05)

    fds_before, rss_before = len(os.listdir("/proc/self/fd")), _status()
    t0 = time.perf_counter()
    split = open_store(store, "train", max_open_shards=max_open_shards)
    opened = time.perf_counter() - t0
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    t1 = time.perf_counter()
    # release_pages None: the trainer's default (data.release_pages), dropping consumed pages
    # from the cache only for a split larger than half the machine's memory.
    loader = FeatureLoader(split, batch, seed=0, reuse_buffers=True, release_pages=None)
    it = iter(loader)
    first = next(it)
    first_latency = time.perf_counter() - t1
    n, nbytes = len(first["keys"]), 0
    t2 = time.perf_counter()
    for b in it:
        n += len(b["keys"])
        nbytes += sum(b[m]["tokens"].numel() * b[m]["tokens"].element_size() for m in loader.modalities)
        if time.perf_counter() - t2 > seconds:
            break
    elapsed = time.perf_counter() - t2
    stop.set()
    watcher.join()
    return {
        "open_s": opened, "first_batch_s": first_latency, "samples_per_s": (n - len(first["keys"])) / elapsed,
        "gb_per_s": nbytes / elapsed / 1e9, "open_files": peak["fds"] - fds_before, "rss_anon_mb": peak["RssAnon"] / 2**20,
        "rss_file_mb": peak["RssFile"] / 2**20, "samples": len(split), "shards": len(split.shards),
        # What opening and reading the store added to the process (Python, torch and the
        # libraries are ~200 MB of the totals above, the same at every size).
        "grew_anon_mb": (peak["RssAnon"] - rss_before["RssAnon"]) / 2**20,
        "grew_file_mb": (peak["RssFile"] - rss_before["RssFile"]) / 2**20,
        "released_pages": loader.release_pages,
    }


def measure_in_child(store: Path, batch: int, seconds: float, max_open_shards: int, loaded: bool) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(store), "--batch", str(batch), "--seconds", str(seconds),
           "--max_open_shards", str(max_open_shards)]
    load = CompetingLoad() if loaded else None
    if load:
        load.__enter__()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        if load:
            load.__exit__(None, None, None)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- sections -------------------------------------------------------------------------------------


def _row(label: str, r: dict) -> str:
    return (f"{label:<22}{r['shards']:>7,}{r['open_s']:>8.2f}{r['first_batch_s']:>9.3f}{r['samples_per_s']:>12,.0f}"
            f"{r['gb_per_s']:>8.2f}{r['open_files']:>7}{r['rss_anon_mb']:>10.0f}{r['rss_file_mb']:>10.0f}"
            f"{r['grew_anon_mb']:>+10.1f}{r['grew_file_mb']:>+10.1f}{'yes' if r['released_pages'] else 'no':>9}")


HEADER = (f"{'store':<22}{'shards':>7}{'open s':>8}{'1st b s':>9}{'samples/s':>12}{'GB/s':>8}{'files':>7}"
          f"{'anon MB':>10}{'file MB':>10}{'anon +MB':>10}{'file +MB':>10}{'release':>9}")


def _flat(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{(hi - lo) / max(lo, 1e-9) * 100:.0f} % spread ({'flat' if hi <= 1.1 * lo else 'NOT flat'})"


def _span(values: list[float]) -> str:
    return f"{min(values):+.1f} to {max(values):+.1f} MB"


def section_samples(args, tmp: Path) -> None:
    print(f"\n## samples: small shapes (8x64 patch + 4-12x64 caption tokens, pooled 64), shards of {args.shard_size:,}, "
          f"batch {args.batch}, {args.seconds:g} s a measurement, max_open_shards {args.max_open_shards}")
    print(HEADER)
    rows: dict[str, list[dict]] = {"idle": [], "loaded": []}
    for size in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"eg-scale-{size}-", dir=tmp))
        try:
            t = time.perf_counter()
            make_store(root, size, args.shard_size, SMALL)
            built = time.perf_counter() - t
            warm(sorted((root / "train").glob("shard-*.h5")))
            for condition in ("idle", "loaded"):
                r = measure_in_child(root, args.batch, args.seconds, args.max_open_shards, condition == "loaded")
                rows[condition].append(r)
                print(_row(f"{size:,} {condition}", r) + (f"   (built in {built:.0f} s)" if condition == "idle" else ""))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    for condition, rs in rows.items():
        if len(rs) > 1:
            print(f"{condition}: open files {_flat([r['open_files'] for r in rs])}, "
                  f"anonymous RSS {_flat([r['rss_anon_mb'] for r in rs])}, file-backed RSS {_flat([r['rss_file_mb'] for r in rs])}; "
                  f"grown by opening and reading the store: anonymous {_span([r['grew_anon_mb'] for r in rs])}, "
                  f"file-backed {_span([r['grew_file_mb'] for r in rs])}")


def section_bytes(args, tmp: Path) -> None:
    per_sample = 576 * 1024 * 2 + 20 * 768 * 2 + 2 * 768 * 2
    print(f"\n## bytes: ViT-L/14-336 shapes ([576, 1024] + [8..32, 768] float16), shards of 256, batch 64, "
          f"{args.seconds:g} s a measurement; machine memory {_memory_gb():.0f} GB")
    print(HEADER)
    for gb in args.gb:
        samples = int(gb * 1e9 / per_sample)
        root = Path(tempfile.mkdtemp(prefix=f"eg-scale-{gb}gb-", dir=tmp))
        try:
            make_store(root, samples, 256, VITL)
            # No warming: a store larger than memory is read from disk, as it would be.
            r = measure_in_child(root, 64, args.seconds, args.max_open_shards, False)
            print(_row(f"{gb:g} GB ({samples:,})", r))
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def section_quant(args, tmp: Path) -> None:
    from compact_store import run_compact_store  # benchmarks/compact_store.py

    run_compact_store(tmp, models=args.models)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", default=["samples", "bytes", "quant"], choices=["samples", "bytes", "quant"])
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--gb", nargs="+", type=float, default=[2, 8, 30])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--shard_size", type=int, default=100, help="samples a shard in the samples section")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--max_open_shards", type=int, default=64)
    p.add_argument("--models", default=None, help="local model set for the quant section (default: built in --tmp)")
    p.add_argument("--tmp", default=None, help="where stores are written (default: the system temp dir)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child's entry point
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.batch, args.seconds, args.max_open_shards)))
        return
    tmp = Path(args.tmp or tempfile.gettempdir())
    print(f"machine: {machine()}")
    for name in args.sections:
        {"samples": section_samples, "bytes": section_bytes, "quant": section_quant}[name](args, tmp)


if __name__ == "__main__":
    main()
