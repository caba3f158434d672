"""What a run writes for people: metrics.jsonl (rank 0) and the parameter table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped, so every
    step appears once even when a crash made the run redo a few steps."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def parameter_table(rows: list[tuple[str, int, int]], run_dir: Path) -> None:
    """Print trainable/frozen parameters per module and keep a copy in the run directory."""
    table = Table(title="parameters")
    table.add_column("module")
    table.add_column("trainable", justify="right")
    table.add_column("frozen", justify="right")
    for name, trainable, frozen in rows:
        table.add_row(name, f"{trainable:,}", f"{frozen:,}")
    table.add_row("[bold]total", f"[bold]{sum(r[1] for r in rows):,}", f"[bold]{sum(r[2] for r in rows):,}")
    Console(stderr=True).print(table)
    (Path(run_dir) / "parameters.json").write_text(json.dumps([{"module": n, "trainable": t, "frozen": f} for n, t, f in rows], indent=1))
