"""Ablation sweeps: variants of one config, trained one after another, reported as one table.

A config with a `sweep` section (configs/mrl_ablation.yaml, configs/perceiver_ablation.yaml)
names its variants as `--set`-style overrides. Each variant is an ordinary run,
`<output_dir>/<experiment.name>-<variant>`, so it checkpoints, resumes and evaluates like any
other; the sweep directory `<output_dir>/<experiment.name>/` holds the variants' resolved
configs and the combined report:

    <output_dir>/<name>/variants/<variant>.yaml    what scripts/sweep.py trains
    <output_dir>/<name>/sweep-<split>.json|csv     one row per variant x pair x dim x direction
    <output_dir>/<name>/sweep-<split>.png          R@1 against MRL dim, one line per variant
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from edge_glass.config import Config, save_config
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic


def sweep_dir(cfg: Config) -> Path:
    return Path(cfg.experiment.output_dir) / cfg.experiment.name


def variant_configs(cfg: Config) -> list[tuple[str, Config]]:
    """(variant name, its config) in the order the sweep lists them."""
    if cfg.sweep is None:
        raise UserError(f"experiment {cfg.experiment.name!r} has no sweep section; train it with scripts/train.py")
    return [(v.name, cfg.variant(v)) for v in cfg.sweep.variants]


def write_variant_configs(cfg: Config) -> list[tuple[str, Path]]:
    """Each variant's resolved config under the sweep directory; (name, path)."""
    out = []
    for name, variant in variant_configs(cfg):
        path = sweep_dir(cfg) / "variants" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_config(variant, path)
        out.append((name, path))
    return out


def evaluate_sweep(cfg: Config, split: str | None = None, which: str = "best") -> list[dict]:
    """Retrieval rows of every variant's run on `split` (default: test, else val), each with `variant`."""
    from edge_glass.features.store import open_checked_split
    from edge_glass.training.report import rows
    from edge_glass.training.task import load_run, stage_of

    if cfg.train.stage != "align":
        raise UserError("sweep reports cover align-stage sweeps (retrieval); evaluate instruct runs with scripts/evaluate.py")
    table = []
    for name, variant in variant_configs(cfg):
        vcfg, model, checkpoint = load_run(Path(variant.experiment.output_dir) / variant.experiment.name, which)
        stage = stage_of(vcfg)
        data = open_checked_split(vcfg, split or vcfg.data.splits.test or vcfg.data.splits.val)
        metrics, _ = stage.evaluate(vcfg, model, stage.eval_batches(vcfg, model, data))
        for row in rows(metrics):
            table.append({"variant": name, "checkpoint": checkpoint.name, **row})
    return table


def write_sweep_report(cfg: Config, table: list[dict], split: str) -> list[Path]:
    """`sweep-<split>.json`, `.csv` and `.png` in the sweep directory."""
    stem = sweep_dir(cfg) / f"sweep-{split}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".csv"), stem.with_suffix(".png")
    variants = {v.name: v.set for v in cfg.sweep.variants}
    write_text_atomic(json_path, json.dumps({"experiment": cfg.experiment.name, "split": split,
                                             "variants": variants, "rows": table}, indent=1))
    columns = list(dict.fromkeys(k for r in table for k in r))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    from edge_glass.training.report import can_plot

    if not can_plot():
        return [json_path, csv_path]
    plot_sweep(table, png_path)
    return [json_path, csv_path, png_path]


def load_sweep_report(sweep_directory: str | Path, split: str = "test") -> dict:
    """The JSON report `scripts/sweep.py` wrote (for notebooks)."""
    path = Path(sweep_directory) / f"sweep-{split}.json"
    if not path.is_file():
        raise UserError(f"{path} not found; make it with: python scripts/sweep.py --config <sweep config>")
    return json.loads(path.read_text())


def plot_sweep(table: list[dict], path: Path | None = None, metric: str = "R@1"):
    """R@1 against MRL dim, one panel per direction, one line per variant; saved to `path`
    (and closed), or returned for a notebook to show."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    directions = sorted({r["direction"] for r in table})
    fig, axes = plt.subplots(1, len(directions), figsize=(4.5 * len(directions), 3.6), squeeze=False)
    for panel, direction in zip(axes[0], directions):
        for variant in dict.fromkeys(r["variant"] for r in table):
            points = sorted((r["dim"], r[metric]) for r in table if r["variant"] == variant and r["direction"] == direction)
            panel.plot([d for d, _ in points], [100 * v for _, v in points], marker="o", label=variant)
        panel.set_xscale("log", base=2)
        panel.set_title(direction.replace("->", " -> "))
        panel.set_xlabel("embedding dim (MRL prefix)")
        panel.set_ylabel(f"{metric} (%)")
        panel.grid(True, alpha=0.3)
        panel.legend(fontsize=8)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
