#!/usr/bin/env python
"""Compact token storage on the CPU twins: bytes a sample and test R@1, against float16.

Run with:
    python benchmarks/compact_store.py                 # ~10 min on 2 cores (also `scale.py --sections quant`)

The twins' store (configs/cpu/trimodal_align.yaml: 8,000 synthetic samples at 32 px, tiny random
CLIP, random Whisper, real all-MiniLM-L6-v2) is extracted in float16, converted to int8 and int4
(`python -m edge_glass.features convert`), and extracted again with 2x2 pooled patches
(`encoders.vision.pool: 2`, float16, then converted to int8). The tri-modal align twin (200
steps, as the README runs it) trains on each, and `scripts/evaluate.py` reports the test split.
R@1 is the mean over the six retrieval directions at the full dimension; the twins' test split
has 300 samples, so one sample is 0.33 points.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu" / "trimodal_align.yaml"
PY = sys.executable


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _script(name: str, *args: str) -> list[str]:
    return [PY, str(REPO / "scripts" / name), *args]


def _store_bytes(split: Path) -> tuple[float, float]:
    """(whole split's files, token rows and scales alone) per sample."""
    from edge_glass.features.quantize import TokenLayout

    manifest = json.loads((split / "manifest.json").read_text())
    n = manifest["num_samples"]
    files = sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())
    tokens = 0.0
    for field, spec in manifest["fields"].items():
        if field.endswith(".tokens"):
            rows = manifest["stats"][field]["count"]  # every token row of the split
            tokens += rows * TokenLayout(spec["dtype"], spec["dim"]).bytes_per_token
    return files / n, tokens / n


def _r1(run: Path) -> float:
    rows = json.loads(sorted((run / "eval").glob("test-step*.json"))[-1].read_text())["rows"]
    full = max(r["dim"] for r in rows)
    values = [r["R@1"] for r in rows if r["dim"] == full]
    return sum(values) / len(values)


def run_compact_store(tmp: Path, models: str | None = None) -> list[dict]:
    from edge_glass.local_models.build import build_local_models

    work = Path(tempfile.mkdtemp(prefix="eg-compact-", dir=tmp))
    try:
        t0 = time.perf_counter()
        if models:
            (work / "models").mkdir()
            os.symlink(Path(models).resolve(), work / "models" / "local")
        else:
            build_local_models(work / "models" / "local", include_real=True, seed=0)
        _run(_script("download_datasets.py", "--dataset", "synthetic", "--num_samples", "8000", "--split_fractions",
                     "0.925", "0.0375", "0.0375", "--image_size", "32", "--no_holdout", "--out", "data/raw/synthetic_cpu"),
             work)
        ds = f"train.deepspeed={REPO / 'ds_configs' / 'zero2.json'}"
        stores = {"float16": "data/features/f16", "pool2 float16": "data/features/p2"}
        _run(_script("extract_features.py", "--config", str(CONFIG), "--set", f"data.features_dir={stores['float16']}"), work)
        _run(_script("extract_features.py", "--config", str(CONFIG), "--set", f"data.features_dir={stores['pool2 float16']}",
                     "--set", "encoders.vision.pool=2"), work)
        for name, src, dtype in (("int8", "float16", "int8"), ("int4", "float16", "int4"), ("pool2 int8", "pool2 float16", "int8")):
            stores[name] = f"data/features/{name.replace(' ', '-')}"
            _run([PY, "-m", "edge_glass.features", "convert", stores[src], stores[name], "--token_dtype", dtype], work)
        results = []
        for name in ("float16", "int8", "int4", "pool2 float16", "pool2 int8"):
            run_name = f"compact-{name.replace(' ', '-')}"
            sets = ["--set", f"data.features_dir={stores[name]}", "--set", f"experiment.name={run_name}", "--set", ds]
            if name.startswith("pool2"):
                sets += ["--set", "encoders.vision.pool=2"]
            _run(_script("train.py", "--config", str(CONFIG), *sets), work)
            _run(_script("evaluate.py", "--run", f"runs/{run_name}", "--split", "test"), work)
            whole, tokens = _store_bytes(work / stores[name] / "train")
            results.append({"store": name, "bytes_per_sample": whole, "token_bytes_per_sample": tokens,
                            "test_R@1": _r1(work / "runs" / run_name)})
        base = results[0]
        print(f"\n## compact token store: CPU twins (configs/cpu/trimodal_align.yaml), test split of 300, "
              f"mean R@1 of 6 directions ({time.perf_counter() - t0:.0f} s)")
        print(f"{'store':<16}{'bytes/sample':>14}{'smaller':>9}{'token bytes':>13}{'smaller':>9}{'test R@1':>10}{'rel. drop':>11}")
        for r in results:
            print(f"{r['store']:<16}{r['bytes_per_sample']:>14,.0f}{base['bytes_per_sample'] / r['bytes_per_sample']:>8.2f}x"
                  f"{r['token_bytes_per_sample']:>13,.0f}{base['token_bytes_per_sample'] / r['token_bytes_per_sample']:>8.2f}x"
                  f"{100 * r['test_R@1']:>9.1f}%{100 * (1 - r['test_R@1'] / base['test_R@1']):>10.1f}%")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="an existing local model set (scripts/make_local_models.py)")
    p.add_argument("--tmp", default=None, help="working directory parent (default: the system temp dir)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loader import machine

    print(f"machine: {machine()}")
    run_compact_store(Path(args.tmp or tempfile.gettempdir()), args.models)


if __name__ == "__main__":
    main()
