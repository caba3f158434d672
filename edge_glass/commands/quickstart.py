#!/usr/bin/env python
"""The CPU quickstart, end to end, on the offline local models and the synthetic tri-modal set.

Run with:
    .venv/bin/python scripts/quickstart.py

Each step is the command a user would type; it is printed, then run. Every step resumes or
skips what is already done, so running the quickstart twice is cheap.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from edge_glass.utils.ports import free_port

CONFIG = "configs/cpu/quickstart.yaml"
"""Relative on purpose: the working directory's own configs/ when it has one (a checkout), else the
package's shipped copy (edge_glass/utils/shipped.py); the run records the same relative paths."""


def steps(num_samples: int, ranks: int, train_overrides: list[str]) -> list[tuple[str, list[str]]]:
    # Each step is an `edge-glass` command run by this interpreter (no PATH or checkout needed).
    cli = [sys.executable, "-m", "edge_glass.cli"]
    # The venv's own `deepspeed` launcher, the command users type on a GPU box, running the
    # train command as a module (`deepspeed --module`), so it works from a wheel as from a checkout.
    deepspeed = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(ranks),
                 "--master_port", str(free_port()), "--module", "edge_glass.commands.train"]
    sets = [arg for o in train_overrides for arg in ("--set", o)]
    return [
        ("local models", cli + ["make-local-models", "--out", "models/local"]),
        ("synthetic data", cli + ["download", "--dataset", "synthetic", "--num_samples", str(num_samples),
                                  "--out", "data/raw/synthetic"]),
        ("feature store", cli + ["extract", "--config", CONFIG]),
        ("align stage", deepspeed + ["--config", CONFIG, *sets]),
        ("evaluate", cli + ["evaluate", "--run", "runs/quickstart", "--split", "test"]),
    ]


def shown(cmd: list[str]) -> str:
    """A step's command as a user would type it: `edge-glass ...`, `deepspeed ...`."""
    if cmd[1:3] == ["-m", "edge_glass.cli"]:
        return shlex.join(["edge-glass", *cmd[3:]])
    return shlex.join(["deepspeed", *cmd[1:]])


def finished(workdir: Path, num_samples: int, max_steps: int) -> dict[str, str | None]:
    """Per step, what shows it already ran to the end (None: run it). Each step would skip its
    own finished work too, but only after starting Python, torch and DeepSpeed (~5-20 s each):
    a finished quickstart should say so in a second."""
    import json

    def exists(*paths: str) -> bool:
        return all((workdir / p).is_file() for p in paths)

    dataset = workdir / "data/raw/synthetic/dataset.json"
    try:
        made = json.loads(dataset.read_text()).get("params", {}).get("num_samples") if dataset.is_file() else None
    except (OSError, ValueError):
        made = None  # unreadable: let the data step look at it and say what is wrong
    splits = ("train", "val", "test")
    return {
        "local models": "models/local" if exists("models/local/index.json") else None,
        "synthetic data": "data/raw/synthetic" if made == num_samples and exists(*(f"data/raw/synthetic/{s}/index.json" for s in splits)) else None,
        "feature store": "data/features/quickstart" if exists(*(f"data/features/quickstart/{s}/manifest.json" for s in splits)) else None,
        "align stage": f"runs/quickstart, step {max_steps}" if exists(f"runs/quickstart/checkpoints/step{max_steps}/meta.json") else None,
        # evaluate.py scores the best checkpoint, whichever step that was.
        "evaluate": next((str(p.relative_to(workdir)) for p in sorted((workdir / "runs/quickstart/eval").glob("test-step*.json"))), None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_samples", type=int, default=2400, help="synthetic samples over train/val/test (default 2400)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (default 2: one per CPU core)")
    parser.add_argument("--workdir", default=".", help="where models/, data/ and runs/ go (default: the current directory)")
    parser.add_argument("--max_steps", type=int, default=None, help="shorter training, e.g. for a smoke test")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    # Offline by design, and DeepSpeed should not probe for a GPU on a CPU box.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    started = time.perf_counter()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    import yaml

    from edge_glass.utils import shipped

    config_file = workdir / CONFIG if (workdir / CONFIG).is_file() else shipped.PACKAGE / CONFIG  # what the steps read
    max_steps = args.max_steps or yaml.safe_load(config_file.read_text())["train"]["max_steps"]
    done = finished(workdir, args.num_samples, max_steps)
    # A step after one that runs must run too: its inputs may have changed.
    rerun = False
    for i, (name, cmd) in enumerate(steps(args.num_samples, args.ranks, overrides), 1):
        if done[name] and not rerun:
            print(f"[{i}] {name}: already done ({done[name]})", flush=True)
            continue
        rerun = True
        print(f"\n[{i}] {name}: {shown(cmd)}", flush=True)
        step_env = dict(env)
        if "--module" in cmd:
            # One thread per rank: the ranks already use every core; more threads only fight.
            step_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
        code = subprocess.call(cmd, cwd=workdir, env=step_env)
        if code != 0:
            print(f"quickstart: step {i} ({name}) failed with exit code {code}", file=sys.stderr)
            return code
    print(f"\nquickstart done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
