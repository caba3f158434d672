"""What a run writes for people: metrics.jsonl (rank 0), its training records, and the parameter table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from edge_glass.training.flops import mfu

from rich.console import Console
from rich.table import Table


class MetricsLog:
    """Append-only JSON lines; on resume, lines past the checkpoint's step are dropped, so every
    step appears once even when a crash made the run redo a few steps."""

    def __init__(self, path: Path, enabled: bool = True, tracker=None) -> None:
        """`tracker` (training/tracking.py) receives every record too."""
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = tracker

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:
            self.tracker.write(record)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

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


def train_record(step: int, epoch: int, window: dict, samples_per_micro: int, lr: float, parts: dict, world: int,
                device: torch.device, peak: float | None) -> dict:
    """The window's metrics.jsonl record (the loss averaged over its finite micro-batches, with
    `skipped_nonfinite` steps counted). Stages with token sequences add `tokens_per_s` (real
    tokens, all ranks) and `useful_fraction` (real tokens over positions computed); `mfu` (the
    window's model FLOPs, of real tokens only where there are tokens) where the FLOPs and the
    device's peak are known; `peak_memory_gib` on a GPU (the allocator's high-water mark)."""
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    # float64: a window's FLOPs pass 2**24 long before they pass float32's range, and sums of
    # token counts must stay exact. The loss terms are device tensors (no sync until here).
    totals = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=device).reshape(())
                          for k in ("loss", "finite", "tokens", "positions", "flops")])
    if world > 1:
        dist.all_reduce(totals)
    loss, finite, tokens, positions, flops = totals.tolist()
    loss = loss / max(finite, 1.0)
    # Every rank did the same work as the counted one: MFU is per device, so the mean.
    utilisation = mfu(flops / world, elapsed, peak) if flops > 0 else None
    token_stats = {"tokens_per_s": tokens / elapsed, "useful_fraction": tokens / positions} if positions > 0 else {}
    memory = {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "loss": float(loss),
        **({"skipped_nonfinite": window["skipped"]} if window["skipped"] else {}),
        "lr": lr,
        "samples_per_s": window["micro"] * samples_per_micro / elapsed,
        "data_wait": window["wait"] / elapsed,
        **{k: float(v) for k, v in parts.items()},
        **token_stats,
        **memory,
        **({"mfu": utilisation} if utilisation is not None else {}),
    }
