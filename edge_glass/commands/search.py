#!/usr/bin/env python
"""Search a split of a run's feature store, or a folder of files, with text, an image or a clip.

    python scripts/search.py --run runs/quickstart --text "a large red circle" --target vision
    python scripts/search.py --run runs/quickstart --image query.png --target text --top_k 10 --json
    python scripts/search.py --run runs/quickstart --folder ~/photos --text "a red circle"

The split's samples (or the folder's files: images, audio or .txt texts, found recursively, a
caption read from the .txt beside an image) are embedded with the run's adapters (at `--dim`,
any MRL size) and scored by cosine similarity against the query's embedding; the top-k keys (file
paths for a folder) come with their scores and captions, as a table and, with --json, as JSON
lines. Files that cannot be read are skipped and counted on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", default=None, help="split to search (default: the config's test split, else val)")
    where.add_argument("--folder", default=None, help="search the files in this folder (and below) instead of a split")
    parser.add_argument("--target", default="vision", help="the modality searched: vision, audio or text")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query")
    query.add_argument("--image", help="an image file query")
    query.add_argument("--audio", help="an audio file query")
    parser.add_argument("--dim", type=int, default=None, help="MRL dimension (default: the full one)")
    parser.add_argument("--top_k", type=int, default=5, help="results shown")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines instead of a table")
    args = parser.parse_args(argv)

    from edge_glass.inference import Predictor

    p = Predictor(args.run, args.checkpoint, args.device)
    modality, item = next((m, v) for m, v in (("text", args.text), ("vision", args.image), ("audio", args.audio)) if v)
    query = p.embed(modality, [item], args.dim)  # a bad query file is refused before the index is built
    if args.folder:
        index, where = p.index_files(args.folder, args.target, args.dim), args.folder
        if index.skipped:
            print(f"skipped {len(index.skipped)} unreadable file(s) of {args.folder}; first: {index.skipped[0]}", file=sys.stderr)
    else:
        where = args.split or p.cfg.data.splits.test or p.cfg.data.splits.val
        index = p.index_split(where, args.target, args.dim)
    results = index.search(query, args.top_k)[0]
    if args.json:
        for rank, r in enumerate(results, 1):
            print(json.dumps({"rank": rank, **r}))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.target} in {where} for {modality} {item!r}")
    for column in ("rank", "key", "score", "caption"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for rank, r in enumerate(results, 1):
        table.add_row(str(rank), r["key"], f"{r['score']:.4f}", r["caption"])
    Console().print(table)
    return 0


if __name__ == "__main__":
    run_main(main)
