"""Retrieval results as people read them: a rich table, JSON, CSV, and recall against MRL dim."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

_KEY = re.compile(r"^(?P<pair>\w+)@(?P<dim>\d+)/(?P<dir>\w+->\w+)/(?P<metric>.+)$")


def rows(metrics: dict[str, float]) -> list[dict]:
    """One row per (pair, dim, direction) with every metric as a column."""
    table: dict[tuple, dict] = {}
    for key, value in metrics.items():
        m = _KEY.match(key.removeprefix("val/"))
        if not m:
            continue
        row = table.setdefault((m["pair"], int(m["dim"]), m["dir"]), {"pair": m["pair"], "dim": int(m["dim"]), "direction": m["dir"]})
        row[m["metric"]] = value
    return [table[k] for k in sorted(table)]


def print_table(rs: list[dict], title: str) -> None:
    """One row per query->key direction and MRL dim."""
    metrics = [k for k in rs[0] if k not in ("pair", "dim", "direction", "mean_rank")] if rs else []
    table = Table(title=title)
    table.add_column("query -> key")
    table.add_column("dim", justify="right")
    for k in metrics:
        table.add_column("median rank" if k == "median_rank" else k, justify="right")
    for r in sorted(rs, key=lambda r: (r["pair"], r["direction"], r["dim"])):
        cells = [r["direction"].replace("->", " -> "), str(r["dim"])]
        for k in metrics:
            v = r[k]
            cells.append(f"{100 * v:.1f}" if k.startswith("R@") else f"{v:.3f}" if k == "MRR" else f"{v:g}")
        table.add_row(*cells)
    # Wide enough for every column even when stdout is a pipe (CI logs, notebooks).
    console = Console()
    console.width = max(console.width, 90)
    console.print(table)


def write_reports(rs: list[dict], summary: dict, out_stem: Path) -> list[Path]:
    """`<stem>.json`, `<stem>.csv` and `<stem>.png` (R@1 against MRL dim, per pair and direction)."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".json"), out_stem.with_suffix(".csv"), out_stem.with_suffix(".png")]
    paths[0].write_text(json.dumps({**summary, "rows": rs}, indent=1))
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rs[0]))
        writer.writeheader()
        writer.writerows(rs)
    if not can_plot():
        return paths[:2]
    plot_recall_vs_dim(rs, paths[2])
    return paths


def can_plot() -> bool:
    """Whether matplotlib is installed (the `plots` extra); without it the reports are JSON and
    CSV only, and this says so once."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    print("no PNG: matplotlib is not installed (pip install 'edge-glass[plots]')")
    return False


def plot_recall_vs_dim(rs: list[dict], path: Path | None = None, metric: str = "R@1", title: str | None = None):
    """`metric` against MRL prefix dim, one line per retrieval direction: written to `path` and
    closed, or, without a path, returned as the figure (what a notebook shows)."""
    if path is not None:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display on servers (a notebook keeps its inline backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rs:
        series.setdefault(r["direction"].replace("->", " -> "), []).append((r["dim"], r[metric]))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim (MRL prefix)")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
