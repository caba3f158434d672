"""Every metrics.jsonl record, also in the tracking tools users watch: TensorBoard, CSV, W&B.

The backends are DeepSpeed's monitors (`deepspeed.monitor.MonitorMaster`), configured from
`train.monitor` (and from a DeepSpeed JSON's own `tensorboard` / `csv_monitor` / `wandb`
sections, which move here). They are driven by the trainer, not by the engine: DeepSpeed's
engine would log only the learning rate, against the number of samples; here every train and
eval record goes out with the optimizer step as its step (`train/loss`, `train/lr`,
`train/data_wait`, `train/mfu`, ..., `val/mean_R@1`, ...), on rank 0 only.

A resumed run redoes the steps after its checkpoint. So that each step appears once, as in
metrics.jsonl: TensorBoard's writer is reopened with `purge_step` (TensorBoard's own mechanism
for discarding what a crashed run logged past the checkpoint), the CSV files are cut after the
step, and W&B continues the same run id (`WANDB_RUN_ID`, resume "allow"; W&B ignores steps it has
seen). `WANDB_MODE=offline` writes the W&B run under `<run>/monitor/wandb` with no network.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import uuid
from pathlib import Path

from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic

SECTIONS = {"tensorboard": "tensorboard", "csv": "csv_monitor", "wandb": "wandb"}
"""`train.monitor` names -> DeepSpeed monitor config sections."""


def monitor_sections(monitors: list[str], ds_cfg: dict, run_dir: Path, project: str) -> dict:
    """The monitor config: `train.monitor`'s backends under `<run>/monitor/`, plus any the
    DeepSpeed JSON enables (taken out of it, so the engine does not log against samples)."""
    sections = {key: ds_cfg.pop(key) for key in SECTIONS.values() if key in ds_cfg}
    for name in monitors:
        key = SECTIONS[name]
        section = sections.setdefault(key, {})
        section["enabled"] = True
        if key == "wandb":
            section.setdefault("project", project)
        else:
            section.setdefault("output_path", str(run_dir / "monitor"))
            section.setdefault("job_name", name)
    return sections


class Tracker:
    """Sends metrics.jsonl records to the configured DeepSpeed monitors (rank 0)."""

    def __init__(self, sections: dict, run_dir: Path, resume_step: int, resumed: bool) -> None:
        """`resume_step`: the step the run continues after (0 for a fresh start, which also
        forgets what an attempt that died before its first checkpoint logged)."""
        self.monitor = None
        enabled = {k: v for k, v in sections.items() if v.get("enabled")}
        if not enabled or D.rank() != 0:
            return
        if "wandb" in enabled:
            _prepare_wandb(run_dir, resumed)
        for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if key in enabled and importlib.util.find_spec(package) is None:
                raise UserError(f"train.monitor: {key} needs the package: pip install {package}")
        from deepspeed.monitor.config import get_monitor_config
        from deepspeed.monitor.monitor import MonitorMaster

        self.monitor = MonitorMaster(get_monitor_config(enabled))
        self._forget_after(resume_step)

    def write(self, record: dict) -> None:
        if self.monitor is None:
            return
        step = int(record["step"])
        prefix = "train/" if record.get("kind") == "train" else ""
        events = [(f"{prefix}{k}", float(v), step) for k, v in record.items()
                  if k not in ("kind", "step", "best") and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))]
        self.monitor.write_events(events)

    def close(self) -> None:
        if self.monitor is None:
            return
        if self.monitor.tb_monitor is not None:
            self.monitor.tb_monitor.summary_writer.close()
        if self.monitor.wandb_monitor is not None:
            import wandb

            wandb.finish()
        self.monitor = None

    def _forget_after(self, step: int) -> None:
        tb = self.monitor.tb_monitor
        if tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = tb.summary_writer.log_dir
            tb.summary_writer.close()
            tb.summary_writer = SummaryWriter(log_dir=log_dir, purge_step=step + 1)
        csv_monitor = self.monitor.csv_monitor
        if csv_monitor is not None:
            for path in Path(csv_monitor.log_dir).glob("*.csv"):
                _cut_csv(path, step)
                # DeepSpeed's CSV monitor writes a header the first time it meets a name in a
                # process; the kept file has one already.
                csv_monitor.filenames.append(path.stem)


def _cut_csv(path: Path, step: int) -> None:
    """Drop the rows of a monitor CSV logged after `step` (header kept), via a temporary file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and float(r[0]) <= step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _prepare_wandb(run_dir: Path, resumed: bool) -> None:
    """W&B writes under the run directory, and a resumed run continues its W&B run (the id is
    kept in `<run>/monitor/wandb_run_id`; a fresh start gets a new one). A user's own WANDB_*
    settings win."""
    monitor = run_dir / "monitor"
    monitor.mkdir(parents=True, exist_ok=True)
    id_file = monitor / "wandb_run_id"
    if not resumed or not id_file.is_file():
        write_text_atomic(id_file, uuid.uuid4().hex[:12])
    os.environ.setdefault("WANDB_DIR", str(monitor))
    os.environ.setdefault("WANDB_NAME", run_dir.name)
    os.environ.setdefault("WANDB_RUN_ID", id_file.read_text().strip())
    os.environ.setdefault("WANDB_RESUME", "allow")
    os.environ.setdefault("WANDB_SILENT", "true")
