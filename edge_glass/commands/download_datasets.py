#!/usr/bin/env python
"""Write a raw dataset as WebDataset shards per split (the README's "Raw data" step).

    python scripts/download_datasets.py --dataset synthetic --num_samples 2000 --out data/synthetic
    python scripts/download_datasets.py --dataset pixmo_cap --num_samples 5000 --out data/raw/pixmo_cap
    python scripts/download_datasets.py --dataset pixmo_qa --num_samples 5000 --out data/raw/pixmo_qa \\
        --source_caps pixmo-docs=500,pixmo-count=500
    python scripts/download_datasets.py --dataset audiocaps --num_samples 2000 --out data/raw/audiocaps --hf_path DIR
    python scripts/download_datasets.py --dataset localized_narratives --num_samples 2000 --out data/raw/ln
    python scripts/download_datasets.py --dataset webdataset --source /data/img2dataset_out --out data/raw/mine

A thin shell over `edge_glass.data`: re-running with the same arguments skips finished shards
(an interrupted run resumes), `--overwrite` regenerates, and other arguments on an existing
directory are refused rather than mixed in. Real sets are read with `datasets.load_dataset` from
the hub, or from a local copy with `--hf_path`; their media are fetched concurrently with
timeouts and retries, and every candidate that cannot be used is skipped, counted by reason,
listed in <out>/skipped.json and summed up at the end.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Sequence

from rich.console import Console
from rich.filesize import decimal

from edge_glass.data.http_fetch import FetchPolicy, parse_mirrors
from edge_glass.data.raw_shards import AUDIO_FORMATS, SKIPPED_FILE, prepare_raw_dataset, write_shards
from edge_glass.data.registry import DATASETS, build_source
from edge_glass.utils.cli import run_main
from edge_glass.utils.errors import UserError
from edge_glass.utils.progress import progress_bar

# Command-line flag -> source keyword argument, for the options only some sources take.
SOURCE_FLAGS = {
    "split_fractions": "fractions",
    "image_size": "image_size",
    "no_holdout": "holdout",
    "hf_path": "hf_path",
    "hf_split": "hf_split",
    "source_caps": "source_caps",
    "min_image_side": "min_image_side",
    "sample_rate": "sample_rate",
    "timeout": "fetch",
    "retries": "fetch",
    "fetch_workers": "fetch",
    "mirror": "fetch",
    "source": "source",
    "map": "field_map",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help=f"which source to write ({', '.join(DATASETS)})")
    p.add_argument("--num_samples", type=int, default=None,
                   help="samples over all splits (real sets: candidates); required except for --dataset webdataset (default: all)")
    p.add_argument("--out", required=True, help="output directory (gets <split>/shard-NNNNNN.tar)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical shards")
    p.add_argument(
        "--split_fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
        help="fractions per split, summing to 1 (default: synthetic 0.8 0.1 0.1, real sets 0.7 0.15 0.15)",
    )
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--audio_format", choices=AUDIO_FORMATS, default="flac", help="16-bit PCM either way")
    p.add_argument("--overwrite", action="store_true", help="regenerate instead of resuming")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shard-writing processes for the synthetic set (default: cores); real sets use --fetch_workers threads")
    synthetic = p.add_argument_group("synthetic")
    synthetic.add_argument("--image_size", type=int, default=None, help="image side in pixels (default 64)")
    synthetic.add_argument("--no_holdout", action="store_true", help="let train use the val/test attribute combos too")
    real = p.add_argument_group("real sets (pixmo_cap, pixmo_qa, audiocaps, localized_narratives; webdataset takes --min_image_side, --sample_rate, --fetch_workers)")
    real.add_argument("--hf_path", default=None,
                      help="local copy of the dataset instead of the hub id (pixmo_qa: a directory with one "
                           "sub-directory per subset; localized_narratives: JSONL file(s) or annotation URLs)")
    real.add_argument("--hf_split", default=None, help="split of the source table to read (default train)")
    real.add_argument("--source_caps", default=None, metavar="NAME=N,...",
                      help="pixmo_qa: samples per subset, e.g. pixmo-docs=500,pixmo-count=0 (the rest share --num_samples)")
    real.add_argument("--min_image_side", type=int, default=None, help="drop images whose short side is smaller (default 32)")
    real.add_argument("--sample_rate", type=int, default=None, help="resample audio to this rate, 0 keeps it (default 16000)")
    real.add_argument("--timeout", type=float, default=None, help="seconds per download attempt (default 30)")
    real.add_argument("--retries", type=int, default=None, help="extra attempts after a timeout/5xx/network error (default 3)")
    real.add_argument("--fetch_workers", type=int, default=None, help="concurrent downloads (default 16)")
    real.add_argument("--mirror", action="append", default=None, metavar="OLD=NEW",
                      help="fetch URLs starting with OLD from NEW instead (repeatable)")
    own = p.add_argument_group("your own shards (webdataset)")
    own.add_argument("--source", default=None, metavar="DIR|PATTERN|LIST",
                     help="a folder of .tar shards, a brace pattern ('/data/{00000..00099}.tar') or a .txt list of shards")
    own.add_argument("--map", action="append", default=None, metavar="FIELD=SOURCE",
                     help="where a field is: caption|image|audio|label = a member extension or json.<dotted path> (repeatable)")
    return p


def _source_options(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Keyword arguments for the source, and the source flags the user set explicitly."""
    given = [flag for flag in SOURCE_FLAGS if getattr(args, flag) is not None and getattr(args, flag) is not False]
    fetch = None
    if any(SOURCE_FLAGS[f] == "fetch" for f in given):
        defaults = FetchPolicy()
        fetch = FetchPolicy(
            timeout_s=args.timeout if args.timeout is not None else defaults.timeout_s,
            retries=args.retries if args.retries is not None else defaults.retries,
            workers=args.fetch_workers if args.fetch_workers is not None else defaults.workers,
            mirrors=parse_mirrors(args.mirror),
        )
    options = {
        "num_samples": args.num_samples,
        "seed": args.seed,
        "fractions": args.split_fractions,
        "image_size": args.image_size,
        "holdout": False if args.no_holdout else None,
        "hf_path": args.hf_path,
        "hf_split": args.hf_split,
        "source_caps": args.source_caps,
        "min_image_side": args.min_image_side,
        "sample_rate": args.sample_rate,
        "fetch": fetch,
        "source": args.source,
        "field_map": args.map,
    }
    return options, given


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples is None and args.dataset != "webdataset":
        raise UserError(f"--dataset {args.dataset} needs --num_samples")
    if args.dataset == "webdataset" and args.source is None:
        raise UserError("--dataset webdataset needs --source: a folder of .tar shards, a brace pattern or a .txt list")
    console = Console(stderr=True)
    started = time.perf_counter()
    options, given = _source_options(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = build_source(args.dataset, options, given, SOURCE_FLAGS)
    for w in caught:
        if issubclass(w.category, UserWarning):
            console.print(f"warning: {w.message}", style="yellow", highlight=False, soft_wrap=True)

    plan = prepare_raw_dataset(
        args.out, source, shard_size=args.shard_size, audio_format=args.audio_format, overwrite=args.overwrite
    )
    if plan.removed_tmp:
        console.print(f"removed {plan.removed_tmp} partial file(s) left by an interrupted run")
    if plan.skipped:
        console.print(f"skipped {plan.skipped} finished shard(s) of {len(plan.jobs)}")
    dropped = 0
    with progress_bar(args.dataset, plan.pending_samples, enabled=bool(plan.pending)) as bar:
        def on_skip(entry: dict) -> None:
            nonlocal dropped
            dropped += 1
            bar.update(description=f"{args.dataset} ({dropped} skipped)")

        summaries = write_shards(plan, workers=args.workers, on_samples=bar.advance, on_skip=on_skip)

    for s in summaries:
        print(f"{s.split}: {s.samples} samples, {s.shards} shards, {decimal(s.bytes)} "
              f"({s.written} written, {s.skipped} skipped)")
    if plan.fetching:
        candidates = sum(s.candidates for s in summaries)
        lost = sum(sum(s.skipped_samples.values()) for s in summaries)
        reasons: dict[str, int] = {}
        for s in summaries:
            for reason, n in s.skipped_samples.items():
                reasons[reason] = reasons.get(reason, 0) + n
        detail = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        print(f"kept {candidates - lost} of {candidates} candidate samples; skipped {lost}"
              + (f" ({detail}); see {plan.out / SKIPPED_FILE}" if lost else ""))
        stats = getattr(source, "fetch_stats", None)
        if stats is not None and stats.requests:
            print(f"fetched {stats.requests} URL(s), {decimal(stats.bytes)}, {stats.retries} retried attempt(s)")
    elapsed = time.perf_counter() - started
    what = "candidate samples processed" if plan.fetching else "samples written"
    print(f"done in {elapsed:.1f} s, {plan.pending_samples} {what} "
          f"({plan.pending_samples / elapsed:,.0f} samples/s) -> {plan.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
