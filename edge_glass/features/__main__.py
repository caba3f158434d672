"""Feature-store tools:

    python -m edge_glass.features verify <store>                         check every shard against its manifest
    python -m edge_glass.features convert SRC DST --token_dtype int8     rewrite a store with other token storage
"""

from __future__ import annotations

import argparse
import sys

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_glass.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every shard's size, sha256 and sample count")
    verify.add_argument("store", help="feature store directory (holds <split>/manifest.json)")
    convert = sub.add_parser("convert", help="rewrite a store with int8/int4 (or float) token storage")
    convert.add_argument("src", help="feature store to read")
    convert.add_argument("dst", help="feature store to write (resumable: complete shards are kept)")
    convert.add_argument("--token_dtype", required=True, choices=["float16", "float32", "int8", "int4"])
    convert.add_argument("--pooled_dtype", choices=["float16", "float32"], default=None, help="default: the source's")
    convert.add_argument("--format", choices=["hdf5", "webdataset", "both"], default=None, help="default: the source's")
    convert.add_argument("--stats_split", default="train", help="split whose statistics the codes are z-scored with")
    convert.add_argument("--workers", type=int, default=0, help="processes converting shards in parallel (0: this one)")
    convert.add_argument("--overwrite", action="store_true", help="replace a destination made with other settings")
    args = parser.parse_args(argv)

    if args.command == "convert":
        from edge_glass.features.convert import convert_store

        formats = None if args.format is None else (["hdf5", "webdataset"] if args.format == "both" else [args.format])
        for split, path in convert_store(args.src, args.dst, args.token_dtype, args.pooled_dtype, formats,
                                         args.stats_split, args.workers, args.overwrite).items():
            print(f"{split}: {path}")
        return 0

    from edge_glass.features.verify import verify_store

    problems = verify_store(args.store)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{args.store}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.store}: every shard matches its manifest")
    return 0


if __name__ == "__main__":
    run_main(main)
