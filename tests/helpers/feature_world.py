"""Shared setup for the feature-store tests (test_extract.py, test_feature_store.py,
test_feature_loader.py, test_encoders_inputs.py).

`feature_world(tmp_path_factory)` builds, once per pytest process whichever module asks first:
the tiny random local models, a small synthetic raw dataset (train 128 samples in shards of
24 + a short last one of 8; val and test 16 each) and a reference feature store extracted
in-process in both formats. Modules wrap it in their own session fixture; the cache here is
what makes it one build for all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pytest
import torch
import yaml

from edge_glass.config import Config, apply_overrides, config_from_dict

REPO = Path(__file__).resolve().parents[2]
NUM_SAMPLES = 160  # splits 128 / 16 / 16
SHARD_SIZE = 24  # train: 5 full shards and one of 8
IMAGE_SIZE = 32  # the tiny CLIP's native size: 4 x 4 patches of 8 px
BATCH_SIZE = 16  # < SHARD_SIZE, so every shard ends in a short batch
FORMATS = ["hdf5", "webdataset"]


@dataclass(frozen=True)
class World:
    root: Path
    models: Path
    raw: Path
    store: Path
    """Reference store: every split, both formats, extracted in-process with `config()`."""

    def config_dict(self, features_dir: Path, overrides: Sequence[str] = (), raw_dir: Path | None = None) -> dict:
        data = {
            "experiment": {"name": "features-test"},
            "data": {"raw_dir": str(raw_dir or self.raw), "features_dir": str(features_dir)},
            "encoders": {
                "batch_size": BATCH_SIZE,
                "vision": {"model": str(self.models / "clip-vision-tiny")},
                "audio": {"model": str(self.models / "whisper-tiny-random"), "audio_seconds": 1.0},
                "text": {"model": str(self.models / "sbert-tiny-random")},
            },
            "model": {"adapters": {m: {"kind": "mlp"} for m in ("vision", "audio", "text")}},
            "loss": {"pairs": {"vision_text": 1.0, "audio_text": 1.0}},
            "train": {"max_steps": 1},
        }
        return apply_overrides(data, list(overrides))

    def config(self, features_dir: Path, overrides: Sequence[str] = (), raw_dir: Path | None = None) -> Config:
        return config_from_dict(self.config_dict(features_dir, overrides, raw_dir))

    def write_config(self, path: Path, features_dir: Path, overrides: Sequence[str] = (), raw_dir: Path | None = None) -> Path:
        path.write_text(yaml.safe_dump(self.config_dict(features_dir, overrides, raw_dir)), encoding="utf-8")
        return path


_WORLD: World | None = None
_ENCODERS: dict = {}


def feature_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    global _WORLD
    if _WORLD is None:
        from edge_glass.data.raw_shards import prepare_raw_dataset, write_shards
        from edge_glass.data.synthetic import SyntheticSource
        from edge_glass.local_models.build import build_local_models

        root = tmp_path_factory.mktemp("feature-world")
        build_local_models(root / "models", include_real=False, seed=0)
        plan = prepare_raw_dataset(
            root / "raw", SyntheticSource(num_samples=NUM_SAMPLES, image_size=IMAGE_SIZE), shard_size=SHARD_SIZE
        )
        write_shards(plan)
        world = World(root, root / "models", root / "raw", root / "store")
        extract(world.config(world.store))
        _WORLD = world
    return _WORLD


def encoders_for(cfg: Config) -> dict:
    """Encoders built once per distinct encoder config (building is cheap, but adds up)."""
    from edge_glass.encoders.factory import build_encoders

    key = json.dumps(
        {m: vars(getattr(cfg.encoders, m)) for m in cfg.encoders.enabled()}, sort_keys=True, default=str
    )
    if key not in _ENCODERS:
        _ENCODERS[key] = build_encoders(cfg.encoders, torch.device("cpu"))
    return _ENCODERS[key]


def extract(cfg: Config, formats: Sequence[str] = FORMATS, overwrite: bool = False, splits: Sequence[str] | None = None) -> dict:
    """In-process extraction, batch size from the config (as the script uses it)."""
    from edge_glass.features.extract import extract_store

    return extract_store(cfg, encoders_for(cfg), formats=list(formats), batch_size=None, overwrite=overwrite, splits=splits)


# --- comparing stores -------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_digests(store: Path) -> dict[str, str]:
    """Every feature shard file (.h5/.tar) of every split: relative path -> sha256."""
    files = sorted(p for p in store.rglob("shard-*") if p.suffix in (".h5", ".tar"))
    return {str(p.relative_to(store)): sha256(p) for p in files}


def records(store: Path) -> dict[str, dict]:
    """Per-shard records without their wall-clock `seconds` (the one field allowed to differ)."""
    out = {}
    for p in sorted(store.rglob("shard-*.json")):
        rec = json.loads(p.read_text())
        rec.pop("seconds")
        out[str(p.relative_to(store))] = rec
    return out


def manifests(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.glob("*/manifest.json"))}


def assert_same_store(a: Path, b: Path) -> None:
    da, db = shard_digests(a), shard_digests(b)
    assert da and da == db
    assert records(a) == records(b)
    assert manifests(a) == manifests(b) and len(manifests(a)) == 3
    for split in ("train", "val", "test"):
        assert (a / split / "extraction.json").read_bytes() == (b / split / "extraction.json").read_bytes()


# --- subprocesses -------------------------------------------------------------------------------


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the torch thread count pinned to this process's, so a
    subprocess computes with the same kernels' reduction order as an in-process extraction."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(extra)
    return env


def start(cmd: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Own session, so the whole group (torchrun's ranks too) can be killed at once."""
    return subprocess.Popen(
        list(cmd), cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """The process and every descendant (torchrun puts its ranks in sessions of their own)."""
    from conftest import kill_tree

    kill_tree(proc.pid, sig)


def run(cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = start(cmd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def extract_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "extract_features.py"), "--config", str(config), *args]
