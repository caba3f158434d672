"""Instruct-stage results as people read them: a table of exact match / token F1 per group, JSON,
and the logged generations as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_glass.utils.io import write_text_atomic


def qa_rows(metrics: dict[str, float]) -> list[dict]:
    """One row per group (`all`, `caption`, `qa`, `qa/<attribute>`) with exact_match and token_f1."""
    groups: dict[str, dict] = {}
    for key, value in metrics.items():
        key = key.removeprefix("val/")
        for metric in ("exact_match", "token_f1"):
            if key == metric or key.endswith("/" + metric):
                group = key[: -len(metric)].rstrip("/") or "all"
                groups.setdefault(group, {"group": group})[metric] = value
    return [groups[g] for g in sorted(groups, key=lambda g: (g != "all", g.count("/"), g))]


def print_qa_table(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    for name in ("examples", "exact match %", "token F1 %"):
        table.add_column(name, justify="left" if name == "examples" else "right")
    for r in qa_rows(metrics):
        table.add_row(r["group"], f"{100 * r.get('exact_match', float('nan')):.1f}", f"{100 * r.get('token_f1', float('nan')):.1f}")
    extras = {k.removeprefix("val/"): v for k, v in metrics.items() if k.removeprefix("val/") in ("lm_loss", "trm/halt_step")}
    console = Console()
    console.width = max(console.width, 90)  # readable in CI logs and notebooks too
    console.print(table)
    console.print("  ".join(f"{k} {v:.4f}" for k, v in extras.items()))


def write_qa_reports(metrics: dict[str, float], samples: list[dict], summary: dict, out_stem: Path) -> list[Path]:
    """`<stem>.json` (summary + every metric) and `<stem>-samples.jsonl` (logged generations)."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".json"), out_stem.parent / f"{out_stem.name}-samples.jsonl"]
    write_text_atomic(paths[0], json.dumps({**summary, "metrics": metrics, "rows": qa_rows(metrics)}, indent=1))
    write_text_atomic(paths[1], "".join(json.dumps(s) + "\n" for s in samples))
    return paths
