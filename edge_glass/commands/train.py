#!/usr/bin/env python
"""Train (or resume) an experiment under DeepSpeed.

Run with:
    deepspeed --num_accelerators 2 scripts/train.py --config configs/cpu/quickstart.yaml
    torchrun --standalone --nproc_per_node 2 scripts/train.py --config ... --deepspeed ds_configs/zero1.json
    python scripts/train.py --config ... --set train.max_steps=50      # one process
    deepspeed --num_gpus 2 --module edge_glass.commands.train --config ...  # from an installed package
A run resumes from its newest complete checkpoint by default (--resume auto).
"""

from __future__ import annotations

import argparse
import os

from edge_glass.config import check_files, load_config
from edge_glass.utils.cli import add_config_args, run_main
from edge_glass.utils.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: train.deepspeed of the config)")
    parser.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a checkpoint directory")
    parser.add_argument("--weights-only", action="store_true",
                        help="load only the weights of the resumed checkpoint (fresh optimizer): for ZeRO-3 <-> ZeRO-1/2")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.deepspeed={args.deepspeed}"] if args.deepspeed else [])
    cfg = load_config(args.config, overrides)
    if cfg.sweep is not None:
        raise UserError(f"{args.config} is a sweep of {len(cfg.sweep.variants)} variants; run it with "
                        f"python scripts/sweep.py --config {args.config}")
    check_files(cfg)

    from edge_glass.training.trainer import train  # heavy imports after the config is known to be good

    run_dir = train(cfg, resume=args.resume, weights_only=args.weights_only)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    run_main(main)
