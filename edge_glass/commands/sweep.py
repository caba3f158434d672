#!/usr/bin/env python
"""Train every variant of an ablation config, then report them as one table.

    python scripts/sweep.py --config configs/mrl_ablation.yaml
    python scripts/sweep.py --config configs/perceiver_ablation.yaml --launcher "deepspeed --num_gpus 2"
    python scripts/sweep.py --config configs/mrl_ablation.yaml --report-only --split test

Each variant is an ordinary run (`<output_dir>/<name>-<variant>`) trained by scripts/train.py
under `--launcher` (default: this Python, one process), so an interrupted sweep re-run resumes
the unfinished variant and skips past finished ones. The report (a table, and
`<output_dir>/<name>/sweep-<split>.{json,csv,png}`) evaluates each variant's best checkpoint.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from edge_glass.utils.cli import add_config_args, run_main
from edge_glass.utils.errors import UserError

TRAIN = "edge_glass.commands.train"
"""The train command, run as a module: from a wheel there is no train.py script to point at, and a
file of this folder run as a script would put the folder on sys.path (where `evaluate.py` would
shadow Hugging Face's `evaluate` library)."""


def train_command(launcher: list[str]) -> list[str]:
    """`launcher` running the train module: `deepspeed ... --module M`, `torchrun ... -m M`,
    `python -m M` (the flag each launcher takes)."""
    name = Path(launcher[0]).name
    if name.startswith("deepspeed"):
        return [*launcher, "--module", TRAIN]
    return [*launcher, "-m", TRAIN]  # python, torchrun, python -m torch.distributed.run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--launcher", default=None,
                        help='command that runs the train command, e.g. "deepspeed --num_gpus 2" or "torchrun --nproc_per_node 2" '
                             '(default: this Python)')
    parser.add_argument("--split", default=None, help="split of the report (default: test, else val)")
    parser.add_argument("--report-only", action="store_true", help="skip training; report the finished variants")
    args = parser.parse_args(argv)

    from edge_glass.config import load_config
    from edge_glass.training.report import print_table
    from edge_glass.training.sweep import evaluate_sweep, write_sweep_report, write_variant_configs

    cfg = load_config(args.config, args.overrides)
    variants = write_variant_configs(cfg)
    if not args.report_only:
        launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
        for i, (name, path) in enumerate(variants, 1):
            cmd = [*train_command(launcher), "--config", str(path)]
            print(f"[{i}/{len(variants)}] {cfg.experiment.name}-{name}: {shlex.join(cmd)}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                raise UserError(f"variant {name!r} failed (its output is above); fix it and re-run: finished variants are kept")
    table = evaluate_sweep(cfg, args.split)
    split = args.split or cfg.data.splits.test or cfg.data.splits.val
    for variant in dict.fromkeys(r["variant"] for r in table):
        mine = [{k: v for k, v in r.items() if k not in ("variant", "checkpoint")} for r in table if r["variant"] == variant]
        print_table(mine, f"{cfg.experiment.name} · {variant} · {split}")
    for path in write_sweep_report(cfg, table, split):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
