#!/usr/bin/env python
"""Evaluate a run: retrieval R@K, MRR and ranks per pair, direction and MRL dim.

Run with:
    python scripts/evaluate.py --run runs/quickstart --split test
Prints a table and writes <run>/eval/<split>-<checkpoint>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory, e.g. runs/quickstart")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the config's test split, else val)")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    args = parser.parse_args(argv)

    from edge_glass.features.loader import FeatureLoader
    from edge_glass.features.store import check_store_matches, open_store
    from edge_glass.training.align_eval import alignment_metrics
    from edge_glass.training.report import print_table, rows, write_reports
    from edge_glass.training.run_loading import load_alignment_model

    cfg, model, checkpoint = load_alignment_model(args.run, args.checkpoint)
    split_name = args.split or cfg.data.splits.test or cfg.data.splits.val
    split = open_store(cfg.data.features_dir, split_name, cfg.data.store_format)
    check_store_matches(split, cfg)
    loader = FeatureLoader(split, cfg.data.eval_batch_size, modalities=cfg.model.adapters.enabled(), shuffle=False, drop_last=False)
    metrics = alignment_metrics(model, loader, cfg.eval.recall_ks, cfg.eval.chunk_size)
    rs = rows(metrics)
    print_table(rs, f"{cfg.experiment.name} · {split_name} ({len(split)} samples, chance R@1 {100 / len(split):.2f}%) · {checkpoint.name}")
    summary = {"run": str(args.run), "split": split_name, "checkpoint": str(checkpoint), "num_samples": len(split)}
    for path in write_reports(rs, summary, Path(args.run) / "eval" / f"{split_name}-{checkpoint.name}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
