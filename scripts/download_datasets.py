#!/usr/bin/env python
"""Write a raw dataset as WebDataset shards per split (DESIGN.md step 1).

    python scripts/download_datasets.py --dataset synthetic --num_samples 2000 --out data/synthetic

A thin shell over `edge_glass.data`: re-running with the same arguments skips finished shards
(an interrupted run resumes), `--overwrite` regenerates, and other arguments on an existing
directory are refused rather than mixed in.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Sequence

from rich.console import Console
from rich.filesize import decimal

from edge_glass.data.raw_shards import AUDIO_FORMATS, prepare_raw_dataset, write_shards
from edge_glass.data.registry import DATASETS, get_dataset
from edge_glass.utils.cli import run_main
from edge_glass.utils.progress import progress_bar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help=f"which source to write ({', '.join(DATASETS)})")
    p.add_argument("--num_samples", type=int, required=True, help="samples over all splits")
    p.add_argument("--out", required=True, help="output directory (gets <split>/shard-NNNNNN.tar)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical shards")
    p.add_argument(
        "--split_fractions", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of --num_samples per split, summing to 1 (rounded by largest remainder)",
    )
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    p.add_argument("--audio_format", choices=AUDIO_FORMATS, default="flac", help="16-bit PCM either way")
    p.add_argument("--no_holdout", action="store_true", help="let train use the val/test attribute combos too")
    p.add_argument("--overwrite", action="store_true", help="regenerate instead of resuming")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard-writing processes (default: cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    factory = get_dataset(args.dataset)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = factory(
            num_samples=args.num_samples,
            seed=args.seed,
            fractions=args.split_fractions,
            image_size=args.image_size,
            holdout=not args.no_holdout,
        )
    for w in caught:
        console.print(f"warning: {w.message}", style="yellow", highlight=False, soft_wrap=True)

    plan = prepare_raw_dataset(
        args.out, source, shard_size=args.shard_size, audio_format=args.audio_format, overwrite=args.overwrite
    )
    if plan.removed_tmp:
        console.print(f"removed {plan.removed_tmp} partial file(s) left by an interrupted run")
    if plan.skipped:
        console.print(f"skipped {plan.skipped} finished shard(s) of {len(plan.jobs)}")
    with progress_bar(args.dataset, plan.pending_samples, enabled=bool(plan.pending)) as bar:
        summaries = write_shards(plan, workers=args.workers, on_samples=bar.advance)

    for s in summaries:
        print(f"{s.split}: {s.samples} samples, {s.shards} shards, {decimal(s.bytes)} "
              f"({s.written} written, {s.skipped} skipped)")
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s, {plan.pending_samples} samples written "
          f"({plan.pending_samples / elapsed:,.0f} samples/s) -> {plan.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
