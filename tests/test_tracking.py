"""Runs are watched where users watch them: every metrics.jsonl record reaches TensorBoard, CSV
and W&B (offline) at its optimizer step, once per step even across a resume, and a run whose
output goes to a file logs progress lines while it runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.random_store import random_store
from helpers.trainer_world import checkpoint, env
from helpers.wandb_log import history

from edge_glass.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def _config(root: Path, **train) -> Path:
    cfg = {
        # Relative to the working directory, so a copy of the place resumes with the same config.
        "experiment": {"name": "watched", "output_dir": "runs"},
        "data": {"raw_dir": "raw", "features_dir": str(root.parent / "store"), "micro_batch_size": 16,
                 "eval_batch_size": 16, "read_block_size": 4},
        "encoders": {"vision": {"model": "random/clip"}, "text": {"model": "random/sbert"}},
        "model": {"shared_dim": 16, "adapters": {m: {"kind": "mlp", "hidden_dim": 16} for m in ("vision", "text")}},
        "loss": {"pairs": {"vision_text": 1.0}},
        "train": {"max_steps": STEPS, "log_interval": 1, "eval_interval": 6, "save_interval": 6, "keep_last": 10,
                  "precision": "fp32", "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
                  "monitor": ["csv", "tensorboard", "wandb"], **train},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tracking")
    cfg = config_from_dict(yaml.safe_load(_config(base / "probe").read_text()))
    shapes = {"vision": (6, 16, 16), "text": ((2, 7), 16, 16)}
    random_store(base / "store", cfg, {"train": (6, 16), "val": (2, 8)}, shapes=shapes)
    return base


def _train(place: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/train.py with stdout and stderr going to files, as under SLURM or nohup."""
    out, err = place / "stdout.log", place / "stderr.log"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config), *args],
                              cwd=place, env=env(WANDB_MODE="offline"), stdout=o, stderr=e, timeout=600)
    assert proc.returncode == 0, f"{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}"
    return proc


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "monitor" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wandb(run: Path) -> dict[str, dict[int, float]]:
    merged: dict[str, dict[int, float]] = {}
    for path in sorted((run / "monitor" / "wandb").glob("offline-run-*/run-*.wandb")):
        for key, points in history(path).items():
            merged.setdefault(key, {}).update(points)
    return merged


@pytest.mark.slow
def test_every_record_reaches_tensorboard_csv_and_wandb_at_its_step_once_across_a_resume(store):
    place = store / "reference"
    config = _config(place, progress_seconds=0.001)
    _train(place, config)
    run = place / "runs" / "watched"
    records = _metrics(run)
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(evals) == [6, 12]

    tb = _tensorboard(run)
    assert [s for s, _ in tb["train/loss"]] == list(range(1, STEPS + 1))
    for step, value in tb["train/loss"]:
        assert value == pytest.approx(train[step]["loss"], rel=1e-6)
    assert [s for s, _ in tb["train/lr"]] == list(range(1, STEPS + 1))
    assert dict(tb["val/mean_R@1"]) == pytest.approx({s: r["val/mean_R@1"] for s, r in evals.items()})

    csv_rows = (run / "monitor" / "csv" / "train_loss.csv").read_text().splitlines()
    assert csv_rows[0] == "step,loss" and [int(r.split(",")[0]) for r in csv_rows[1:]] == list(range(1, STEPS + 1))

    wb = _wandb(run)
    assert wb["train/loss"] == pytest.approx({s: r["loss"] for s, r in train.items()})
    assert wb["val/mean_R@1"] == pytest.approx({s: r["val/mean_R@1"] for s, r in evals.items()})

    # Output to a file: progress lines while running (one a step at this interval), not one at the end.
    lines = [ln for ln in (place / "stderr.log").read_text().splitlines() if ln.startswith("train watched")]
    assert len(lines) >= 4 and "steps/s" in lines[0] and "eta" in lines[0] and "loss" in lines[-1]

    # The same run killed after its step-6 checkpoint, having logged steps 7-12 already: the
    # resumed run redoes them, and each step is still there once, with the resumed values.
    resumed = store / "resumed"
    shutil.copytree(place, resumed, ignore=shutil.ignore_patterns("stdout.log", "stderr.log"))
    config = _config(resumed, progress_seconds=0.001)
    shutil.rmtree(checkpoint(resumed / "runs" / "watched", 12))
    _train(resumed, config)
    run2 = resumed / "runs" / "watched"
    train2 = {r["step"]: r["loss"] for r in _metrics(run2) if r["kind"] == "train"}
    tb2 = _tensorboard(run2)
    assert [s for s, _ in tb2["train/loss"]] == list(range(1, STEPS + 1))
    assert dict(tb2["train/loss"]) == pytest.approx(train2)
    rows = (run2 / "monitor" / "csv" / "train_loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, STEPS + 1))
    assert _wandb(run2)["train/loss"] == pytest.approx(train2)


def test_a_missing_tracking_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from edge_glass.training.tracking import Tracker
    from edge_glass.utils.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^train\.monitor: wandb needs the package: pip install wandb$"):
        Tracker({"wandb": {"enabled": True}}, tmp_path, resume_step=0, resumed=False)


def test_a_deepspeed_json_s_own_monitor_sections_move_to_the_trainer(tmp_path):
    from edge_glass.training.tracking import monitor_sections

    ds = {"tensorboard": {"enabled": True, "output_path": "/elsewhere", "job_name": "mine"}, "zero_optimization": {}}
    sections = monitor_sections(["csv"], ds, tmp_path, "proj")
    assert ds == {"zero_optimization": {}}, "the engine logs nothing itself (it would count samples, not steps)"
    assert sections == {"tensorboard": {"enabled": True, "output_path": "/elsewhere", "job_name": "mine"},
                        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "csv"}}
