"""A fourth modality is one entry in the modality table: a copy of the package whose only change
is a `depth` row in edge_glass/modalities.py trains depth<->text alignment through the normal
scripts, on a store of random features, and evaluates it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.trainer_world import env

REPO = Path(__file__).resolve().parents[1]

DEPTH_ROW = '''    ModalitySpec("depth", raw_field="depth", encoder="edge_glass.encoders.clip_vision:ClipVisionEncoder",
                 encoder_config="edge_glass.config:VisionEncoderConfig",
                 encoder_doc="Frozen depth-map encoder (a CLIP on depth renders); null for runs without depth."),
'''

# The child writes the store with the copied package (its config knows `depth`).
WRITE_STORE = """
import sys, yaml
from pathlib import Path
import edge_glass
assert Path(edge_glass.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), edge_glass.__file__
from edge_glass.config import load_config
from helpers.random_store import random_store
cfg = load_config(sys.argv[2])
shapes = {"vision": (6, 16, 16), "depth": ((3, 7), 12, 12), "text": ((2, 7), 16, 16)}
random_store(Path(cfg.data.features_dir), cfg, {"train": (6, 8), "val": (2, 8)}, shapes=shapes)
"""


def _package_with_depth(root: Path) -> Path:
    pkg = root / "pkg"
    shutil.copytree(REPO / "edge_glass", pkg / "edge_glass", ignore=shutil.ignore_patterns("__pycache__"))
    table = pkg / "edge_glass" / "modalities.py"
    text = table.read_text()
    anchor = '    ModalitySpec("text",'
    assert text.count(anchor) == 1
    table.write_text(text.replace(anchor, DEPTH_ROW + anchor))
    return pkg


def _config(root: Path) -> Path:
    encoder = {"model": "random/clip"}
    cfg = {
        "experiment": {"name": "depth", "output_dir": str(root / "runs")},
        "data": {"raw_dir": str(root / "raw"), "features_dir": str(root / "store"), "micro_batch_size": 16, "eval_batch_size": 16,
                 "read_block_size": 4},
        "encoders": {"vision": encoder, "depth": encoder, "text": {"model": "random/sbert"}},
        "model": {"shared_dim": 16, "adapters": {m: {"kind": "mlp", "hidden_dim": 16} for m in ("vision", "depth", "text")}},
        "loss": {"pairs": {"vision_text": 1.0, "depth_text": 1.0, "vision_depth": 0.5}},
        "train": {"max_steps": 12, "log_interval": 1, "eval_interval": 12, "save_interval": 12, "precision": "fp32",
                  "deepspeed": str(REPO / "ds_configs" / "zero2.json")},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], pkg: Path, cwd: Path) -> subprocess.CompletedProcess:
    environ = env(PYTHONPATH=f"{pkg}:{REPO / 'tests'}")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_a_fourth_modality_in_the_table_trains_and_evaluates_through_the_scripts(tmp_path):
    pkg = _package_with_depth(tmp_path)
    config = _config(tmp_path)
    _run(["-c", WRITE_STORE, str(pkg), str(config)], pkg, tmp_path)
    _run([str(REPO / "scripts" / "train.py"), "--config", str(config)], pkg, tmp_path)
    run = tmp_path / "runs" / "depth"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train) == 12 and train[-1] < train[0]
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    assert any(k.startswith("val/depth_text@16/depth->text/R@1") for k in evaluation)
    assert any(k.startswith("val/vision_depth@16/") for k in evaluation)

    _run([str(REPO / "scripts" / "evaluate.py"), "--run", str(run), "--split", "val"], pkg, tmp_path)
    (report,) = (run / "eval").glob("val-*.json")
    rows = json.loads(report.read_text())["rows"]
    assert {r["pair"] for r in rows} == {"vision_text", "depth_text", "vision_depth"}
    assert all(0.0 <= r["R@1"] <= 1.0 for r in rows if "R@1" in r)
