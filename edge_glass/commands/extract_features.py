#!/usr/bin/env python
"""Run the frozen encoders once over the raw shards and write the feature store.

Run with:
    python scripts/extract_features.py --config configs/cpu/quickstart.yaml
    torchrun --standalone --nproc_per_node 2 scripts/extract_features.py --config ... --format both
Re-running resumes: finished shards are kept, interrupted ones redone.
"""

from __future__ import annotations

import argparse

from edge_glass.config import load_config
from edge_glass.utils.cli import add_config_args, run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--format", choices=["hdf5", "webdataset", "both"], default=None,
                        help="store backend(s) to write (default: data.store_format of the config)")
    parser.add_argument("--batch_size", type=int, default=None, help="samples per encoder forward (default: encoders.batch_size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace a store made with other encoders or settings")
    parser.add_argument("--split", action="append", default=None, help="only this split (repeatable; default: all of the config's)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    # Heavy imports after argument parsing, so --help and config errors answer at once.
    from edge_glass.encoders.base import resolve_device
    from edge_glass.encoders.factory import build_encoders
    from edge_glass.features.extract import extract_store
    from edge_glass.utils import distributed as D

    formats = ["hdf5", "webdataset"] if args.format == "both" else [args.format or cfg.data.store_format]
    D.init_process_group()
    clean = False
    try:
        encoders = build_encoders(cfg.encoders, resolve_device(args.device))
        manifests = extract_store(cfg, encoders, formats, args.batch_size, args.overwrite, args.split)
        if D.rank() == 0:
            for split, path in manifests.items():
                print(f"{split}: {path}")
        clean = True
    finally:
        D.teardown(clean)
    return 0


if __name__ == "__main__":
    run_main(main)
