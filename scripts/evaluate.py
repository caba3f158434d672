#!/usr/bin/env python
"""Evaluate a run on a split of its feature store.

    python scripts/evaluate.py --run runs/quickstart --split test

An align run gets retrieval R@K, MRR and ranks per pair, direction and MRL dim (a table, and
<run>/eval/<split>-<checkpoint>.{json,csv,png}); an instruct run gets LM loss, exact match and
token F1 per example kind and QA attribute, from greedy generation (a table, and
<run>/eval/<split>-<checkpoint>.json plus the generations in ...-samples.jsonl).
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
    parser.add_argument("--features_dir", default=None,
                        help="evaluate on another store of the same encoders, e.g. its int8 conversion "
                             "(default: the run's data.features_dir)")
    parser.add_argument("--num_samples_to_log", type=int, default=None,
                        help="instruct runs: generations to write (default: the config's eval.num_samples_to_log)")
    args = parser.parse_args(argv)

    from edge_glass.config import load_config
    from edge_glass.utils.errors import UserError

    config_path = Path(args.run) / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{args.run} is not a run directory (no config.yaml)")
    if load_config(config_path).train.stage == "instruct":
        return _instruct(args)
    return _align(args)


def _open_eval_split(cfg, split_name: str, features_dir: str | None):
    """The split to evaluate: the run's store, or another store of the same encoders (how it
    stores them, float16 or int8/int4, may differ: the model dequantises)."""
    from edge_glass.features.store import check_same_encoders, check_store_matches, open_store

    split = open_store(features_dir or cfg.data.features_dir, split_name, cfg.data.store_format)
    if features_dir is not None:
        check_same_encoders(split, open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format))
    check_store_matches(split, cfg)
    print(f"store: {split.path} ({split.token_dtype} tokens)")
    return split


def _align(args) -> int:
    from edge_glass.features.loader import FeatureLoader
    from edge_glass.training.align_eval import alignment_metrics
    from edge_glass.training.report import print_table, rows, write_reports
    from edge_glass.training.run_loading import load_alignment_model

    cfg, model, checkpoint = load_alignment_model(args.run, args.checkpoint)
    split_name = args.split or cfg.data.splits.test or cfg.data.splits.val
    split = _open_eval_split(cfg, split_name, args.features_dir)
    loader = FeatureLoader(split, cfg.data.eval_batch_size, modalities=cfg.model.adapters.enabled(), shuffle=False, drop_last=False)
    metrics = alignment_metrics(model, loader, cfg.eval.recall_ks, cfg.eval.chunk_size)
    rs = rows(metrics)
    print_table(rs, f"{cfg.experiment.name} · {split_name} ({len(split)} samples, chance R@1 {100 / len(split):.2f}%) · {checkpoint.name}")
    summary = {"run": str(args.run), "split": split_name, "checkpoint": str(checkpoint), "num_samples": len(split)}
    for path in write_reports(rs, summary, Path(args.run) / "eval" / f"{split_name}-{checkpoint.name}"):
        print(f"wrote {path}")
    return 0


def _instruct(args) -> int:
    from edge_glass.training.instruct_eval import instruct_metrics
    from edge_glass.training.instruct_report import print_qa_table, write_qa_reports
    from edge_glass.training.instruct_batches import InstructBatcher
    from edge_glass.training.instruct_task import eval_loader, load_instruct_model

    cfg, model, checkpoint = load_instruct_model(args.run, args.checkpoint)
    split_name = args.split or cfg.data.splits.test or cfg.data.splits.val
    split = _open_eval_split(cfg, split_name, args.features_dir)
    pad_id, eos_id = model.special_ids()
    loader = eval_loader(cfg, split, InstructBatcher(cfg, model.tokenizer, pad_id=pad_id, eos_id=eos_id))
    n_log = cfg.eval.num_samples_to_log if args.num_samples_to_log is None else args.num_samples_to_log
    metrics, samples = instruct_metrics(model, loader, max_new_tokens=cfg.eval.max_new_tokens,
                                        max_samples=cfg.eval.max_samples, num_samples_to_log=n_log)
    print_qa_table(metrics, f"{cfg.experiment.name} · {split_name} · {int(metrics['num_examples'])} examples · {checkpoint.name}")
    summary = {"run": str(args.run), "split": split_name, "checkpoint": str(checkpoint), "decoder": model.kind}
    for path in write_qa_reports(metrics, samples, summary, Path(args.run) / "eval" / f"{split_name}-{checkpoint.name}"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
