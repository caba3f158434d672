#!/usr/bin/env python
"""One instruct training step (Qwen + LoRA, soft prefix, chat-template QA examples of varied
length): the plain step against each optimisation, alone and together.

Run with:
    python benchmarks/instruct_step.py                      # the CPU twin's tiny Qwen, then Qwen2.5-0.5B shapes
    python benchmarks/instruct_step.py --shapes tiny        # seconds
    python benchmarks/instruct_step.py --device cuda --batch 64 --seq 512 --dtype bf16   # on a GPU
    python benchmarks/instruct_step.py --find-batch --shapes qwen2.5-0.5b --memory-limit-gb 60

Variants (decoder.qwen settings; every one computes the same loss, printed to show it):

    plain     one example per row, padded to the batch's longest; every position's logits and
              Hugging Face's loss (loss_chunk_rows: null, packing: false)
    chunked   the same rows; logits of the answer tokens only, in chunks (decoders/chunked_ce.py)
    grouped   chunked, and the examples sorted by length and run as --groups padded sub-batches
              (length-grouped batching, as LLaVA's `group_by_modality_length` does across steps);
              their summed losses over the supervised tokens, so the same mean
    packed    chunked, and several examples per row of up to --seq tokens (decoders/packing.py)
    +ckpt     packed with gradient_checkpointing     (with --extra)
    +compile  packed with compile: true               (with --extra; the first steps compile)

Each (shape, variant) runs in a fresh process, so its peak memory is its own: on a CPU how far
resident memory rises above the loaded model during the timed steps (the kernel's high-water
mark, reset after the warm-up step), on a GPU `torch.cuda.max_memory_allocated`. Per step:
forward + backward of the decoder's `batch_loss` with the LoRA adapters and the prefix trainable
(what the instruct stage trains). Reported: tokens/s (real tokens: padding excluded), positions/s
(everything computed), the useful fraction (real / computed), the supervised (answer) fraction,
peak memory, and the ratios against `plain` from the same run. Qwen2.5-0.5B shapes: random
weights in the real shape (`_gpu_check_models.py`); values do not change the speed.

`--find-batch` doubles the number of examples per step, for the packed variant, until the step's
peak memory passes --memory-limit-gb (or the GPU runs out), and prints tokens/s per size: the
micro-batch that fills the device (data.micro_batch_size is samples; each gives ~5 examples on
the QA mixes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "plain": {"loss_chunk_rows": None},
    "chunked": {},
    "grouped": {},
    "packed": {"packing": True},
    "+ckpt": {"packing": True, "gradient_checkpointing": True},
    "+compile": {"packing": True, "compile": True},
}
"""Variant -> decoder.qwen settings over the defaults."""
BASIC = ("plain", "chunked", "grouped", "packed")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def machine(device: str) -> str:
    from loader import machine as cpu_machine

    return cpu_machine() + (f", {torch.cuda.get_device_name()}" if device == "cuda" else "")


def examples(batch: int, seed: int = 0) -> list[dict]:
    """QA examples of varied length, as a QA mix has: short questions with one-word answers
    beside long descriptions (prompt 3-60 words, answer 1-40)."""
    import random

    rng = random.Random(seed)
    words = "red green blue small large circle square triangle star top left bottom right middle".split()
    out = []
    for _ in range(batch):
        q = "What " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + "?"
        answer_words = rng.randint(1, 3) if rng.random() < 0.6 else rng.randint(5, 40)
        a = " ".join(rng.choice(words) for _ in range(answer_words))
        out.append({"prompt": q, "answer": a})
    return out


def one_variant(model_dir: str, variant: str, batch: int, seq: int, steps: int, device: str, dtype: str,
                groups: int) -> dict:
    """In this process: build the decoder, time `steps` steps after one warm-up."""
    from edge_glass.config import LoraConfig, QwenConfig
    from edge_glass.decoders.base import IGNORE_INDEX
    from edge_glass.decoders.qwen import QwenDecoder

    torch.manual_seed(0)
    dev = torch.device(device)
    dec = QwenDecoder(QwenConfig(model=model_dir, tune="lora", lora=LoraConfig(dropout=0.0), max_length=seq,
                                 **VARIANTS[variant]), dtype=DTYPES[dtype]).to(dev)
    dec.prepare_training()  # as the instruct stage does (compiles the layers with compile: true)
    dec.train()
    n_prefix = 8
    data = examples(batch)
    if variant == "grouped":
        order = sorted(range(batch), key=lambda i: len(data[i]["prompt"]) + len(data[i]["answer"]))
        size = -(-batch // groups)
        parts = [order[k : k + size] for k in range(0, batch, size)]
    else:
        parts = [list(range(batch))]
    batches = []
    for idx in parts:
        b = dec.encode_examples([data[i] for i in idx], n_prefix)
        batches.append(({k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in b.items()}, idx))
    prefix = torch.randn(batch, n_prefix, dec.width, device=dev, dtype=dec.embed_dtype, requires_grad=True)
    positions = sum(b["input_ids"].numel() for b, _ in batches)
    useful = sum(int(b["num_tokens"]) for b, _ in batches)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _ in batches]
    supervised = sum(counts)

    def step() -> float:
        total = 0.0
        for (b, idx), n in zip(batches, counts):
            loss, _ = dec.batch_loss(prefix[idx], b)
            # Each group's mean times its share of the supervised tokens: the batch's mean.
            (loss * (n / supervised)).backward()
            total += float(loss.detach()) * n / supervised
        return total

    loss = step()  # warm-up (allocator, kernels, compilation)
    if variant == "+compile":
        step()  # a second shape-specialised compile can happen on the second call
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        # The process's peak RSS is the model's loading; reset the kernel's high-water mark so the
        # peak below is the steps' own (Linux: writing 5 to clear_refs resets VmHWM).
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kb("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    # GPU: the allocator's peak; CPU: how far resident memory rose above the loaded model during the steps.
    # (The high-water mark restarts at the current RSS, which may sit below `before` once the
    # allocator has returned memory: then the steps raised nothing, a rise of 0.)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else max(0, _status_kb("VmHWM") - before) * 1024
    return {"variant": variant, "batch": batch, "loss": loss, "step_s": seconds, "tokens_per_s": useful / seconds,
            "positions_per_s": positions / seconds, "useful_fraction": useful / positions,
            "supervised_fraction": supervised / positions, "rows": sum(b["input_ids"].shape[0] for b, _ in batches),
            "peak_bytes": peak}


def _status_kb(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def _run_one(args, model: Path, variant: str, batch: int) -> dict | None:
    """One variant in a fresh process; None when it ran out of memory."""
    cmd = [sys.executable, __file__, "--_one", str(model), variant, "--batch", str(batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype, "--groups", str(args.groups)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if "out of memory" in proc.stderr.lower():
            return None
        raise RuntimeError(f"{variant} at batch {batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "qwen2.5-0.5b"],
                        choices=["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"])
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("--seq", type=int, default=256, help="max_length of an example, and a packed row's length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--groups", type=int, default=4, help="sub-batches of the grouped variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="the decoder's weights")
    parser.add_argument("--extra", action="store_true", help="also packed + gradient checkpointing, packed + compile")
    parser.add_argument("--find-batch", action="store_true", help="the largest packed batch within --memory-limit-gb")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="with --find-batch: the step's peak memory cap")
    parser.add_argument("--max-batch", type=int, default=1024, help="with --find-batch: stop doubling here")
    parser.add_argument("--models", default=None, help="where the models are built (default: a temp dir)")
    parser.add_argument("--_one", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(one_variant(args._one[0], args._one[1], args.batch, args.seq, args.steps, args.device,
                                     args.dtype, args.groups)))
        return {}

    sys.path.insert(0, str(HERE))
    from _gpu_check_models import model_dir
    from rich.console import Console

    console = Console(width=170)  # the whole table, also in a log file
    console.print(f"machine: {machine(args.device)}")
    builders = {"tiny": "qwen", "qwen2.5-0.5b": "qwen", "qwen2.5-1.5b": "qwen-1.5b"}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="instruct-step-") as tmp:
        root = Path(args.models or tmp)
        for shape in args.shapes:
            model = model_dir(root / shape, builders[shape], dry_run=shape == "tiny")
            if args.find_batch:
                results[shape] = _find_batch(args, model, shape, console)
                continue
            variants = list(BASIC) + (["+ckpt", "+compile"] if args.extra else [])
            rows = [_run_one(args, model, v, args.batch) for v in variants]
            if any(r is None for r in rows):
                raise SystemExit(f"{shape}: out of memory at batch {args.batch}; lower --batch")
            results[shape] = rows
            console.print(_table(f"{shape}: {args.batch} examples of up to {args.seq} tokens, LoRA r16, "
                                 f"{args.dtype} weights, {args.device}", rows, rows[0]))
    return results


def _table(title: str, rows: list[dict], base: dict):
    from rich.table import Table

    table = Table(title=title)
    for column in ("variant", "batch", "rows", "loss", "ms/step", "tokens/s", "positions/s", "useful", "supervised",
                   "step peak MB", "tokens/s vs plain", "memory vs plain"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], str(r["batch"]), str(r["rows"]), f"{r['loss']:.4f}", f"{1e3 * r['step_s']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['positions_per_s']:,.0f}", f"{r['useful_fraction']:.2f}",
                      f"{r['supervised_fraction']:.2f}", f"{r['peak_bytes'] / 2**20:,.0f}",
                      f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                      f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base["peak_bytes"] > 0 else "-")
    return table


def _find_batch(args, model: Path, shape: str, console) -> list[dict]:
    rows: list[dict] = []
    batch = args.batch
    while batch <= args.max_batch:
        r = _run_one(args, model, "packed", batch)
        if r is None:
            console.print(f"{shape}: batch {batch} ran out of memory")
            break
        rows.append(r)
        if r["peak_bytes"] >= args.memory_limit_gb * 2**30:
            break
        batch *= 2
    fits = [r for r in rows if r["peak_bytes"] < args.memory_limit_gb * 2**30]
    best = max(fits, key=lambda r: r["tokens_per_s"]) if fits else None
    console.print(_table(f"{shape}: packed, batch doubled up to {args.memory_limit_gb:g} GB step peak, {args.device}",
                         rows, rows[0]))
    console.print(f"{shape}: " + (f"best batch within the limit: {best['batch']} examples, "
                                  f"{best['tokens_per_s']:,.0f} tokens/s" if best else "no batch fits the limit"))
    return rows


if __name__ == "__main__":
    main()
