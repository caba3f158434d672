#!/usr/bin/env python
"""One prepared check of the pipeline's speed on a GPU box: extraction, align and instruct stages.

Run with (normally through benchmarks/gpu_check.sh, which sets the environment):
    python benchmarks/gpu_check.py                      # real shapes, a few minutes on one H100/H200
    python benchmarks/gpu_check.py --dry-run --out tmp  # tiny shapes, seconds, any machine

A GPU lease is short and the box has no internet, so everything it needs is made on the box
(random-weight models of the real architectures, synthetic data) and every section is bounded in
time and guarded: one failure is reported in the output and the others still run.

  vision_extract  CLIP ViT-L/14-336 in bf16 through the repo's ClipVisionEncoder: image
                  preprocessing alone (CPU), encode() (the forward with the stored layer captured
                  by a hook; tokens stay on the device) and the bare model forward, on synthetic
                  480x360 images, batch 64.
  extract         extraction end to end with that encoder alone (extract_store: raw shards,
                  decoding and preprocessing in worker processes, encode, float16 on the device,
                  one pinned copy, HDF5 written by a writer thread) against the bare forward of the
                  same batches: the fraction of the encoder's speed extraction keeps.
  loader          benchmarks/loader.py's measurement on this box's CPUs: the FeatureLoader at
                  ViT-L/14-336 shapes against a bare index_select of the same bytes, idle and with
                  a busy process per core; on a GPU also its rate into page-locked buffers, which
                  is what training there reads into.
  align           the align stage as a user runs it: a synthetic raw set
                  (scripts/download_datasets.py), a feature store from the real-shape encoders
                  (extract_store: decode, preprocess, encode, write HDF5), then scripts/train.py
                  for a fixed number of steps; samples/s and data-wait come from the run's
                  metrics.jsonl, start-up window excluded.
  instruct        Qwen2.5-0.5B- and 1.5B-shaped QwenDecoder with LoRA (r 16 on q,k,v,o) behind a
                  Connector prefix, bf16, torch AdamW, QA examples of varied length up to 512
                  tokens: the plain step (padded rows, full logits) against packed rows with
                  the answer-token loss, then compiled decoder layers, then a batch that fills
                  the GPU; real tokens/s, the useful fraction and MFU over real tokens
                  (edge_glass.training.flops), FlopCounterMode's count as a check.

It writes gpu_check.json and gpu_check.md to --out after every section (so a run cut short
still leaves what it measured) and prints the table at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from _gpu_check_models import model_dir  # noqa: E402
from edge_glass.training.flops import causal_lm_flops_per_token, count_flops, linear_params, mfu, peak_flops  # noqa: E402


@dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    dry_run: bool
    align_precision: str
    seconds: float
    """Measured time per timed loop (after warm-up)."""
    work: Path
    models: Path

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def model(self, name: str) -> Path:
        return model_dir(self.models, name, self.dry_run)


def timed(ctx: Context, step: Callable[[], object], warmup: int = 2, min_steps: int = 3) -> tuple[int, float]:
    """(steps, seconds) of `step` run for about ctx.seconds after `warmup` untimed calls; the
    device is synchronised at both ends, so queued GPU work is inside the time."""
    for _ in range(warmup):
        step()
    ctx.sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < ctx.seconds:
        step()
        n += 1
    ctx.sync()
    return n, time.perf_counter() - t0


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# (i) extraction: CLIP ViT-L/14-336 through the repo's encoder
# --------------------------------------------------------------------------------------------


def vision_extract(ctx: Context) -> dict:
    import numpy as np
    from PIL import Image

    from edge_glass.config import VisionEncoderConfig
    from edge_glass.encoders.clip_vision import ClipVisionEncoder

    batch = 8 if ctx.dry_run else 64
    width, height = (40, 30) if ctx.dry_run else (480, 360)  # larger than the crop, so resizing is timed too
    enc = ClipVisionEncoder(VisionEncoderConfig(model=str(ctx.model("vision")), dtype=dtype_name(ctx.dtype)),
                            ctx.device, ctx.dtype)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(batch)]

    n, s = timed(ctx, lambda: enc.prepare(images), warmup=1, min_steps=2)
    prepare_rate = n * batch / s
    prepared = enc.prepare(images)
    n, s = timed(ctx, lambda: enc.encode(prepared))
    encode_rate = n * batch / s
    pixels = prepared["pixel_values"].to(ctx.device, ctx.dtype)

    @torch.inference_mode()
    def bare() -> None:
        enc.model(pixel_values=pixels)

    n, s = timed(ctx, bare)
    bare_rate, bare_batch_s = n * batch / s, s / n
    flops_per_image = count_flops(bare) / batch
    peak = peak_flops(ctx.device, ctx.dtype)
    cfg = enc.model.config
    del enc
    return {
        "what": f"CLIP ViT (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.image_size} px, "
                f"patch {cfg.patch_size}), {dtype_name(ctx.dtype)}, batch {batch}, {width}x{height} images",
        "metrics": {
            "prepare_samples_per_s": prepare_rate,
            "encode_samples_per_s": encode_rate,
            "bare_forward_samples_per_s": bare_rate,
            "forward_gflops_per_image": flops_per_image / 1e9,
            "forward_tflops_per_s": flops_per_image * bare_rate / 1e12,
            "forward_mfu": mfu(flops_per_image * batch, bare_batch_s, peak),
        },
    }


def extract(ctx: Context) -> dict:
    """End-to-end extraction with CLIP alone vs its bare forward on the same batches."""
    from edge_glass.config import VisionEncoderConfig, config_from_dict
    from edge_glass.data.raw_shards import iter_raw_samples
    from edge_glass.encoders.clip_vision import ClipVisionEncoder
    from edge_glass.features.extract import extract_store
    from edge_glass.features.prepared_batches import default_num_workers

    work = ctx.work / "extract"
    work.mkdir(parents=True, exist_ok=True)
    samples, image_size, batch = (96, 32, 16) if ctx.dry_run else (4096, 336, 64)
    run_script([str(REPO / "scripts" / "download_datasets.py"), "--dataset", "synthetic", "--num_samples", str(samples),
                "--out", str(work / "raw"), "--image_size", str(image_size), "--shard_size", str(max(samples // 8, 16)),
                "--split_fractions", "1", "0", "0", "--workers", str(min(8, os.cpu_count() or 1))],
               work / "download.log", timeout=300)
    # The schema wants a complete experiment; only `data` and `encoders.batch_size` are read here,
    # and only the vision encoder is passed to extract_store.
    cfg = config_from_dict({
        "experiment": {"name": "gpu-check-extract"},
        "data": {"raw_dir": str(work / "raw"), "features_dir": str(work / "store"),
                 "splits": {"train": "train", "val": "train", "test": None}},
        "encoders": {"batch_size": batch, "vision": {"model": str(ctx.model("vision")), "layer": -2},
                     "text": {"model": str(ctx.model("text"))}},
        "model": {"adapters": {"vision": {"kind": "mlp"}, "text": {"kind": "mlp"}}},
        "loss": {"pairs": {"vision_text": 1.0}},
        "train": {"max_steps": 1},
    })
    vision = ClipVisionEncoder(VisionEncoderConfig(model=str(ctx.model("vision")), layer=-2, dtype=dtype_name(ctx.dtype)),
                               ctx.device, ctx.dtype)
    images = [s["image"] for _, s in zip(range(batch), iter_raw_samples(work / "raw" / "train"))]
    pixels = vision.prepare(images)["pixel_values"].to(ctx.device, ctx.dtype)

    @torch.inference_mode()
    def bare() -> None:
        vision.model(pixel_values=pixels)

    n, s = timed(ctx, bare)
    bare_rate = n * batch / s
    extract_store(cfg, {"vision": vision}, ["hdf5"], splits=["train"], overwrite=True)  # warm-up: workers, files
    ctx.sync()
    t = time.perf_counter()
    extract_store(cfg, {"vision": vision}, ["hdf5"], splits=["train"], overwrite=True)
    ctx.sync()
    rate = samples / (time.perf_counter() - t)
    return {
        "what": f"CLIP ViT-L/14-336 alone, {dtype_name(ctx.dtype)}, batch {batch}, {samples} synthetic {image_size}-px "
                f"images, {default_num_workers()} preprocessing workers",
        "metrics": {"extract_samples_per_s": rate, "bare_forward_samples_per_s": bare_rate,
                    "extract_over_bare": rate / bare_rate},
    }


def loader(ctx: Context) -> dict:
    """benchmarks/loader.py's ViT-L measurement, in-process (CPU work; the box's cores)."""
    import numpy as np
    from loader import SHAPES, CompetingLoad, batch_rows, loader_epoch, make_store, measure, warm

    from edge_glass.features.loader import FeatureLoader, default_reader_threads
    from edge_glass.features.store import open_store

    samples = 256 if ctx.dry_run else 2048
    root = ctx.work / "loader"
    make_store(root, samples, 256 if not ctx.dry_run else 64, SHAPES["vitl"])
    warm(sorted((root / "train").glob("shard-*.h5")))
    batches = batch_rows(root, 64, seed=0)
    whole = open_store(root, "train").read(0, samples, ["vision", "text"], with_meta=False)
    text = whole.modalities["text"]
    padded = np.zeros((samples, int(text.lengths.max()), text.tokens.shape[1]), np.float16)
    padded[np.arange(padded.shape[1])[None, :] < text.lengths[:, None]] = text.tokens
    arrays = [torch.from_numpy(whole.modalities["vision"].tokens.reshape(samples, -1)),
              torch.from_numpy(padded.reshape(samples, -1))]
    feature_loader = FeatureLoader(open_store(root, "train"), 64, seed=0, reuse_buffers=True)
    for _ in feature_loader:
        pass
    # Training on a GPU reads into page-locked buffers from the CUDA allocator (run_setup.py),
    # not the huge pages the CPU path uses: the same epoch into those, timed on its own.
    pinned = None
    if torch.cuda.is_available():
        pinned = FeatureLoader(open_store(root, "train"), 64, seed=0, reuse_buffers=True, pin_memory=True)
        for _ in pinned:
            pass
    metrics = {"reader_threads": default_reader_threads()}
    for condition in ("idle", "loaded"):
        load = CompetingLoad() if condition == "loaded" else None
        if load:
            load.__enter__()
        try:
            best = measure(arrays, batches, feature_loader, 2 if ctx.dry_run else 5, root / "train")
            if pinned is not None:
                rates = [loader_epoch(pinned)[0] for _ in range(2 if ctx.dry_run else 5)]
                metrics[f"{condition}_pinned_loader_gb_s"] = float(np.median(rates)) / 1e9
        finally:
            if load:
                load.__exit__(None, None, None)
        limit = max(best["one"], best["default"])
        metrics[f"{condition}_gather_limit_gb_s"] = limit / 1e9
        metrics[f"{condition}_loader_gb_s"] = best["loader"][0] / 1e9
        metrics[f"{condition}_ratio"] = best["ratio"]
        metrics[f"{condition}_pread_ratio"] = best["pread_ratio"]
        metrics[f"{condition}_loader_of_pread"] = best["loader_of_pread"]
        metrics[f"{condition}_cpu_pread_of_loader"] = best["cpu_ratio"]
    shutil.rmtree(root, ignore_errors=True)
    return {"what": f"{samples} samples of [576, 1024] + [8..32, 768] float16 tokens, batch 64, "
                    f"{metrics['reader_threads']} reader threads, {os.cpu_count()} cores", "metrics": metrics}


# --------------------------------------------------------------------------------------------
# (ii) align stage: raw set -> feature store -> scripts/train.py, read back from metrics.jsonl
# --------------------------------------------------------------------------------------------


def run_script(args: list[str], log: Path, timeout: float) -> None:
    """Run a repo script with this interpreter; its output goes to `log`, whose tail is the error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with log.open("w") as f:
        try:
            code = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:.0f} s"
    if code != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{Path(args[0]).name} failed ({code}); end of {log}:\n{tail}")


def align(ctx: Context) -> dict:
    from edge_glass.config import config_from_dict, save_config
    from edge_glass.encoders.factory import build_encoders
    from edge_glass.features.extract import extract_store

    work = ctx.work / "align"
    work.mkdir(parents=True, exist_ok=True)
    samples, image_size, micro_batch, steps, log_every = (
        (120, 32, 8, 4, 1) if ctx.dry_run else (2560, 336, 256, 300, 10))
    run_script([str(REPO / "scripts" / "download_datasets.py"), "--dataset", "synthetic", "--num_samples", str(samples),
                "--out", str(work / "raw"), "--image_size", str(image_size), "--shard_size", str(max(samples // 8, 16)),
                "--workers", str(min(8, os.cpu_count() or 1))], work / "download.log", timeout=120)

    # The quickstart's model (configs/cpu/quickstart.yaml), so the GPU figure compares with the
    # CPU one in BENCHMARKS.md; only the encoders, the batch and the run length differ.
    cfg = config_from_dict({
        "experiment": {"name": "gpu-check", "output_dir": str(work / "runs")},
        "data": {"raw_dir": str(work / "raw"), "features_dir": str(work / "store"), "micro_batch_size": micro_batch},
        "encoders": {"batch_size": 16 if ctx.dry_run else 64,
                     "vision": {"model": str(ctx.model("vision")), "layer": -2},
                     "audio": {"model": str(ctx.model("audio")), "audio_seconds": 1.0},
                     "text": {"model": str(ctx.model("text"))}},
        "model": {"shared_dim": 256, "mrl_dims": [32, 64, 128],
                  "adapters": {"vision": {"kind": "attn_pool", "hidden_dim": 512, "num_heads": 4},
                               "audio": {"kind": "attn_pool", "hidden_dim": 512, "num_heads": 4},
                               "text": {"kind": "mlp", "hidden_dim": 512}}},
        "loss": {"pairs": {"vision_text": 1.0, "audio_text": 1.0, "vision_audio": 0.5}},
        "optim": {"lr": 1e-3, "warmup_steps": 20},
        "train": {"stage": "align", "precision": ctx.align_precision, "max_steps": steps, "log_interval": log_every,
                  "eval_interval": steps, "save_interval": steps, "deepspeed": str(REPO / "ds_configs" / "zero2.json")},
    })
    save_config(cfg, work / "align.yaml")

    encoders = build_encoders(cfg.encoders, ctx.device)
    t = time.perf_counter()
    extract_store(cfg, encoders, ["hdf5"])
    extract_s = time.perf_counter() - t
    del encoders
    free_memory()

    t = time.perf_counter()
    run_script([str(REPO / "scripts" / "train.py"), "--config", str(work / "align.yaml")], work / "train.log",
               timeout=120 if ctx.dry_run else 240)
    train_wall = time.perf_counter() - t
    records = [json.loads(line) for line in (work / "runs" / "gpu-check" / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if r["kind"] == "train"]
    # The first window holds start-up (allocator growth, kernel selection); drop it when there are others.
    steady = windows[1:] or windows
    # Every window trains the same number of samples, so its duration is proportional to 1/rate.
    weights = [1.0 / r["samples_per_s"] for r in steady]
    return {
        "what": f"3 encoders ({'tiny' if ctx.dry_run else 'CLIP ViT-L/14-336, Whisper-base 1-s window, MiniLM-L6'}) "
                f"-> quickstart adapters, precision {ctx.align_precision}, micro-batch {micro_batch}, {steps} steps, "
                f"{samples} synthetic samples",
        "metrics": {
            "extract_samples_per_s": samples / extract_s,
            "train_samples_per_s": len(steady) / sum(weights),
            "data_wait": sum(w * r["data_wait"] for w, r in zip(weights, steady)) / sum(weights),
            "train_wall_s": train_wall,
            # The trainer's own MFU (first micro-step FLOP-counted), on GPUs with a known peak.
            **({"train_mfu": sum(w * r["mfu"] for w, r in zip(weights, steady)) / sum(weights)}
               if all("mfu" in r for r in steady) else {}),
        },
        "windows": [{k: r[k] for k in ("step", "samples_per_s", "data_wait", "mfu") if k in r} for r in windows],
    }


# --------------------------------------------------------------------------------------------
# (iii) instruct stage: Qwen2.5-0.5B-shaped decoder + LoRA + connector prefix
# --------------------------------------------------------------------------------------------


def instruct(ctx: Context) -> dict:
    """Qwen2.5-0.5B and 1.5B shapes with LoRA: the plain step against the optimised one (packed
    rows, answer-token loss, compiled layers, then a batch that fills the GPU), in one run."""
    out: dict = {"metrics": {}, "what": []}
    for name, label in (("qwen", "0.5b"), ("qwen-1.5b", "1.5b")):
        one = _instruct_one(ctx, name)
        out["what"].append(f"{label}: {one['what']}")
        out["metrics"].update({f"{label}_{k}": v for k, v in one["metrics"].items()})
        out["peak_flops"], out["flops_note"] = one["peak_flops"], one["flops_note"]
        free_memory()
    out["what"] = "; ".join(out["what"])
    return out


INSTRUCT_VARIANTS = (
    # (name, examples per step, packed, loss_chunk_rows, compiled layers)
    ("plain", "small", False, None, False),     # today's step: padded rows, every position's logits
    ("packed", "small", True, 1024, False),     # packed rows + the answer tokens' logits only
    ("compiled", "small", True, 1024, True),    # ... + torch.compile of each decoder layer
    ("filled", "large", True, 1024, True),      # ... at a batch that fills the GPU
)


def _instruct_one(ctx: Context, model_name: str) -> dict:
    from instruct_step import examples as qa_examples

    from edge_glass.config import DecoderConfig, LoraConfig, ModelConfig, QwenConfig
    from edge_glass.decoders.qwen import QwenDecoder
    from edge_glass.models.connector import Connector

    # "large": ~96 x 170 real tokens, ~16k a step, packed into ~32 rows of 512; activations of
    # the 1.5B shape at that size take ~60 GB in bf16 (no activation checkpointing).
    sizes, seq = ({"small": 4, "large": 8}, 64) if ctx.dry_run else ({"small": 16, "large": 96}, 512)
    decoder_defaults, shared_dim = DecoderConfig(), ModelConfig().shared_dim
    prefix = decoder_defaults.num_prefix_tokens
    lora = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    decoder = QwenDecoder(QwenConfig(model=str(ctx.model(model_name)), tune="lora", lora=lora, max_length=seq,
                                     loss_chunk_rows=None), dtype=ctx.dtype).to(ctx.device)
    decoder.train()
    connector = Connector(shared_dim, decoder.hidden_size, prefix, kind=decoder_defaults.connector).to(ctx.device)
    trainable = [p for m in (decoder, connector) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast(ctx.device.type, dtype=ctx.dtype, enabled=ctx.dtype != torch.float32)

    def batch_of(n: int, packed: bool) -> tuple[dict, torch.Tensor]:
        # QA examples of varied length (a QA mix: one-word answers beside long descriptions),
        # tokenised and collated as the instruct stage does (decoder.qwen.packing).
        decoder.cfg.packing = packed
        b = decoder.encode_examples(qa_examples(n), prefix)
        features = torch.randn(n, shared_dim, generator=torch.Generator().manual_seed(0))
        return {k: v.to(ctx.device) for k, v in b.items()}, features.to(ctx.device)

    def forward_backward(b: dict, features: torch.Tensor) -> None:
        with autocast:
            loss, _ = decoder.batch_loss(connector(features), b)
        loss.backward()

    metrics: dict = {}
    counted, flops_note = None, None
    peak, is_compiled = peak_flops(ctx.device, ctx.dtype), False
    for name, size, packed, chunk, compiled in INSTRUCT_VARIANTS:
        decoder.cfg.loss_chunk_rows = chunk
        # What decoder.qwen.compile does, from here on; not in the dry run (a CPU compiles for
        # minutes, and tests/test_qwen_switches.py checks the compiled layers' results).
        if compiled and not is_compiled and not ctx.dry_run:
            decoder.cfg.compile = True
            decoder.prepare_training()
            is_compiled = True
        n = sizes[size]
        b, features = batch_of(n, packed)
        useful, positions = int(b["num_tokens"]), b["input_ids"].numel()

        def step() -> None:
            forward_backward(b, features)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            steps, seconds = timed(ctx, step, warmup=3)
        except torch.OutOfMemoryError:
            metrics[f"{name}_error"] = f"out of memory at {n} examples of up to {seq} tokens"
            opt.zero_grad(set_to_none=True)
            free_memory()
            continue
        step_s = seconds / steps
        # Model FLOPs of the real tokens only (MFU's definition: padding is not the model's work),
        # each attending over the mean example length, plus the connector once per example.
        mean_len = useful / n
        connector_flops = 6.0 * linear_params(connector)[0] * n
        flops = causal_lm_flops_per_token(decoder.model, int(mean_len)) * useful + connector_flops
        metrics.update({
            f"{name}_examples": n,
            f"{name}_ms_per_step": 1e3 * step_s,
            f"{name}_tokens_per_s": useful / step_s,
            f"{name}_useful_fraction": useful / positions,
            f"{name}_mfu": mfu(flops, step_s, peak),
            f"{name}_peak_memory_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None,
        })
        if name == "plain":
            # The cross-check counts what ran, padding included: every position of every row,
            # attending over the row's width (the formula's convention, and the counter's).
            width = b["input_ids"].shape[1]
            metrics["flops_per_step"] = causal_lm_flops_per_token(decoder.model, width) * positions + connector_flops
            try:
                counted = count_flops(lambda: forward_backward(b, features))
            except Exception as e:  # noqa: BLE001 -- the count is a cross-check; older torch lacks some attention formulas
                flops_note = f"FlopCounterMode failed: {type(e).__name__}: {e}"
            opt.zero_grad(set_to_none=True)
        if f"{name}_tokens_per_s" in metrics and "plain_tokens_per_s" in metrics:
            metrics[f"{name}_speedup"] = metrics[f"{name}_tokens_per_s"] / metrics["plain_tokens_per_s"]
    metrics["counted_flops_per_step"] = counted
    lm_trainable, lm_frozen = linear_params(decoder.model)
    metrics.update(lora_params=lm_trainable, frozen_params=lm_frozen)
    cfg = decoder.model.config.get_text_config()
    return {
        "what": f"Qwen2 (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}) + LoRA r "
                f"{lora.r} on q,k,v,o + {decoder_defaults.connector} connector ({prefix} prefix tokens), "
                f"{dtype_name(ctx.dtype)} weights and autocast, QA examples of up to {seq} tokens; "
                f"{sizes['small']} examples a step ({sizes['large']} for 'filled')",
        "metrics": metrics,
        "peak_flops": peak,
        "flops_note": flops_note,
    }


SECTIONS: dict[str, Callable[[Context], dict]] = {"vision_extract": vision_extract, "extract": extract,
                                                 "loader": loader, "align": align, "instruct": instruct}
# Cheap, self-contained sections first: the align stage has the most moving parts (subprocesses,
# DeepSpeed) and the longest run, so a global timeout cuts it rather than the others.
RUN_ORDER = ("vision_extract", "extract", "loader", "instruct", "align")

TABLE: dict[str, tuple[str, list[tuple[str, str, str | None]]]] = {
    "vision_extract": ("(i) extraction", [
        ("bare_forward_samples_per_s", "vision forward, bare `model(pixel_values)`", "{:,.1f} samples/s"),
        ("encode_samples_per_s", "repo `ClipVisionEncoder.encode` (layer captured, stays on device)", "{:,.1f} samples/s"),
        ("prepare_samples_per_s", "repo `prepare` (image preprocessing, 1 CPU thread)", "{:,.1f} samples/s"),
        ("forward_tflops_per_s", "vision forward throughput", "{:,.1f} TFLOP/s"),
        ("forward_mfu", "vision forward MFU", "{:.1%}"),
    ]),
    "extract": ("(i) extraction end to end", [
        ("extract_samples_per_s", "`extract_store`, CLIP alone (workers, device conversion, writer)", "{:,.1f} samples/s"),
        ("bare_forward_samples_per_s", "bare forward, same batches", "{:,.1f} samples/s"),
        ("extract_over_bare", "extraction / bare forward (target >= 0.8)", "{:.2f}"),
    ]),
    "loader": ("(ii) feature loader", [
        ("idle_loader_gb_s", "FeatureLoader, idle", "{:,.2f} GB/s"),
        ("idle_gather_limit_gb_s", "gather limit (bare index_select), idle", "{:,.2f} GB/s"),
        ("idle_ratio", "loader / gather limit, idle (target >= 0.8)", "{:.2f}"),
        ("loaded_ratio", "loader / gather limit, a busy process per core (target >= 0.8)", "{:.2f}"),
        ("idle_pread_ratio", "kernel pread copy alone / gather limit, idle", "{:.2f}"),
        ("idle_loader_of_pread", "loader / kernel pread copy, idle", "{:.2f}"),
        ("loaded_loader_of_pread", "loader / kernel pread copy, loaded", "{:.2f}"),
        ("idle_pinned_loader_gb_s", "FeatureLoader into page-locked buffers (as training reads), idle", "{:,.2f} GB/s"),
        ("loaded_pinned_loader_gb_s", "FeatureLoader into page-locked buffers, loaded", "{:,.2f} GB/s"),
    ]),
    "align": ("(ii) align stage", [
        ("extract_samples_per_s", "`extract_store` end to end, 3 encoders", "{:,.1f} samples/s"),
        ("train_samples_per_s", "training, `scripts/train.py` (DeepSpeed ZeRO-2)", "{:,.1f} samples/s"),
        ("data_wait", "training time spent waiting for data (target < 5 %)", "{:.1%}"),
        ("train_mfu", "training MFU (the trainer's own, in metrics.jsonl)", "{:.1%}"),
    ]),
    "instruct": ("(iii) instruct stage (Qwen2.5-0.5B and 1.5B shapes, LoRA)", [
        row for size in ("0.5b", "1.5b") for row in [
            (f"{size}_plain_ms_per_step", f"{size}: step (forward, backward, AdamW), plain: padded rows, full logits", "{:,.1f} ms"),
            (f"{size}_plain_tokens_per_s", f"{size}: real tokens/s, plain", "{:,.0f} tokens/s"),
            (f"{size}_plain_useful_fraction", f"{size}: real tokens / positions computed, plain", "{:.0%}"),
            (f"{size}_plain_mfu", f"{size}: MFU over real tokens, plain (analytic model FLOPs / dense peak)", "{:.1%}"),
            (f"{size}_packed_mfu", f"{size}: MFU, packed rows + answer-token loss", "{:.1%}"),
            (f"{size}_compiled_mfu", f"{size}: MFU, ... + compiled decoder layers", "{:.1%}"),
            (f"{size}_filled_mfu", f"{size}: MFU, ... at the large batch (target >= 40 % at 1.5b)", "{:.1%}"),
            (f"{size}_filled_speedup", f"{size}: real tokens/s, filled / plain", "{:.2f}x"),
            (f"{size}_filled_tokens_per_s", f"{size}: real tokens/s, filled", "{:,.0f} tokens/s"),
            (f"{size}_counted_flops_per_step", f"{size}: FlopCounterMode / analytic FLOPs, plain step", None),
            (f"{size}_plain_peak_memory_gib", f"{size}: peak GPU memory, plain", "{:,.1f} GiB"),
            (f"{size}_filled_peak_memory_gib", f"{size}: peak GPU memory, filled", "{:,.1f} GiB"),
        ]
    ]),
}


def _cell(metrics: dict, key: str, fmt: str | None) -> str:
    if key.endswith("counted_flops_per_step"):  # shown as a ratio: how far the formula is from torch's count
        analytic = metrics[key.replace("counted_flops_per_step", "flops_per_step")]
        return "not counted" if metrics[key] is None else f"{metrics[key] / analytic:.3f}"
    value = metrics.get(key)
    return "n/a on this device" if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"GPU check{' (dry run, tiny shapes)' if results['dry_run'] else ''}: **{env['device_name']}**, "
        f"{env['dtype']}, {results['started']}",
        f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, "
        f"deepspeed {env['deepspeed']}, Python {env['python']}; dense peak "
        + (f"{env['peak_tflops']:,.1f} TFLOP/s" if env["peak_tflops"] else "unknown (no MFU)"),
        "",
        "| section | measurement | value |",
        "|---|---|---:|",
    ]
    for name, (title, rows) in TABLE.items():
        section = results["sections"].get(name)
        if section is None:
            lines.append(f"| {title} | not run (time ran out) | |")
        elif "error" in section:
            lines.append(f"| {title} | **failed**: {section['error'].splitlines()[0][:160]} | |")
        else:
            lines.append(f"| {title} | {section['what']} | |")
            for key, label, fmt in rows:
                lines.append(f"| | {label} | {_cell(section['metrics'], key, fmt)} |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    peak = peak_flops(device, dtype)
    return {
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "peak_tflops": peak / 1e12 if peak else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, end to end in seconds on any machine")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out"), help="where gpu_check.json and .md go")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (default 15, dry run 0.3)")
    p.add_argument("--sections", nargs="+", choices=RUN_ORDER, default=list(RUN_ORDER))
    p.add_argument("--align-precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="train.precision of the align run (auto: bf16 on GPUs that have it, as a user's run)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-model load/save bars would bury the section lines

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 where the GPU has it (what extraction and training use there); fp32 on CPU, where bf16 is slow.
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="eg-gpu-check-"))
    seconds = args.seconds or (0.3 if args.dry_run else 15.0)
    ctx = Context(device, dtype, args.dry_run, args.align_precision, seconds, work, work / "models")
    results = {"dry_run": args.dry_run, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "environment": environment(device, dtype), "sections": {}}
    try:
        for name in (n for n in RUN_ORDER if n in args.sections):
            print(f"gpu_check: {name} ...", flush=True)
            t = time.perf_counter()
            try:
                section = SECTIONS[name](ctx)
            except Exception as e:  # noqa: BLE001 -- one failing section must not stop the others
                traceback.print_exc()
                section = {"error": f"{type(e).__name__}: {e}"}
            section["wall_s"] = time.perf_counter() - t
            results["sections"][name] = section
            free_memory()
            (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
            (out / "gpu_check.md").write_text(markdown(results))
            print(f"gpu_check: {name} {'FAILED' if 'error' in section else 'done'} in {section['wall_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
