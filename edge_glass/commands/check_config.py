#!/usr/bin/env python
"""Validate an experiment config (with overrides) and print the resolved YAML.

Run with:
    python scripts/check_config.py --config configs/cpu/quickstart.yaml --set optim.lr=3e-4
"""

from __future__ import annotations

import argparse
import sys

from edge_glass.config import check_files, config_fingerprint, dump_config, load_config
from edge_glass.utils.cli import add_config_args, run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--no-files", action="store_true", help="skip checking that named files and models exist")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not args.no_files:
        check_files(cfg)
    sys.stdout.write(dump_config(cfg))
    print(f"# ok: {args.config} (fingerprint {config_fingerprint(cfg)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
