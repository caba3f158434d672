"""`python -m edge_glass.features verify <store>`: check a feature store against its manifests."""

from __future__ import annotations

import argparse
import sys

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_glass.features", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check every shard's size, sha256 and sample count")
    verify.add_argument("store", help="feature store directory (holds <split>/manifest.json)")
    args = parser.parse_args(argv)

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
