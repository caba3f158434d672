#!/usr/bin/env python
"""Evaluate a run on a split of its feature store.

    python scripts/evaluate.py --run runs/quickstart --split test

On `--device` (default: the GPU when there is one), with a progress bar. An align run gets
retrieval R@K, MRR and ranks per pair, direction and MRL dim (a table, and
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
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--num_samples_to_log", type=int, default=None,
                        help="instruct runs: generations to write (default: the config's eval.num_samples_to_log)")
    parser.add_argument("--classes", default=None,
                        help="align runs: zero-shot classification with these comma-separated class names "
                             "(instead of the config's eval.zero_shot_classes); a sample's class is its --label_field")
    parser.add_argument("--template", action="append", default=None,
                        help="zero-shot prompt template with {} for the class (repeatable; default: the config's)")
    parser.add_argument("--label_field", default=None,
                        help="the raw JSON field holding a sample's class or group, a dotted path for nested "
                             "fields (default: the config's eval.label_field)")
    args = parser.parse_args(argv)

    from edge_glass.features.store import open_checked_split
    from edge_glass.inference import device_from
    from edge_glass.training.task import load_run, stage_of
    from edge_glass.utils.progress import tracked

    device = device_from(args.device)
    cfg, model, checkpoint = load_run(args.run, args.checkpoint)
    cfg = with_eval_overrides(cfg, args)
    model = model.to(device)
    stage = stage_of(cfg)
    split_name = args.split or cfg.data.splits.test or cfg.data.splits.val
    # Another store of the same encoders may be evaluated, e.g. its int8 conversion: the model
    # dequantises whatever the store holds.
    split = open_checked_split(cfg, split_name, args.features_dir)
    print(f"store: {split.path} ({split.token_dtype} tokens)")
    n_log = cfg.eval.num_samples_to_log if args.num_samples_to_log is None else args.num_samples_to_log
    batches = tracked(stage.eval_batches(cfg, model, split), f"evaluate {split_name} on {device}", len(split),
                      count=lambda batch: len(batch["keys"]))
    metrics, logged = stage.evaluate(cfg, model, batches, num_samples_to_log=n_log)
    summary = {"run": str(args.run), "split": split_name, "checkpoint": str(checkpoint), "num_samples": len(split),
               "stage": cfg.train.stage, **({"decoder": model.kind} if hasattr(model, "kind") else {})}
    for path in stage.report(cfg, metrics, logged, summary, Path(args.run) / "eval" / f"{split_name}-{checkpoint.name}"):
        print(f"wrote {path}")
    return 0


def with_eval_overrides(cfg, args):
    """The run's config with this evaluation's classes, templates and label field (checked as
    the config section is: a template without {} is one line)."""
    import dataclasses

    from edge_glass.config import ConfigError
    from edge_glass.utils.errors import UserError

    changes = {}
    if args.classes is not None:
        changes["zero_shot_classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.template is not None:
        changes["zero_shot_templates"] = args.template
    if args.label_field is not None:
        changes["label_field"] = args.label_field
    try:
        return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))
    except ConfigError as e:
        raise UserError(str(e).replace("{path}", "eval")) from None


if __name__ == "__main__":
    run_main(main)
