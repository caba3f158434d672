#!/usr/bin/env python
"""One instruct training step (Qwen + LoRA, soft prefix, chat-template QA examples): the plain
loss (full logits, Hugging Face's loss) against the chunked loss over the answer tokens only.

Run with:
    python benchmarks/instruct_step.py                      # the CPU twin's tiny Qwen, then Qwen2.5-0.5B shapes
    python benchmarks/instruct_step.py --shapes tiny        # seconds
    python benchmarks/instruct_step.py --device cuda --batch 16 --seq 256   # on a GPU

Each (shape, variant) runs in a fresh process, so its peak memory is its own: on a CPU how far
resident memory rises above the loaded model during the timed steps (the kernel's high-water
mark, reset after the warm-up step), on a GPU `torch.cuda.max_memory_allocated`. Per step: forward + backward of the decoder's
`batch_loss` with the LoRA adapters and the prefix trainable (what the instruct stage trains).
Reported: tokens/s (every position of the padded batch), useful tokens/s (the real ones:
padding excluded), the useful fraction, the supervised (answer) fraction, peak memory, and the
optimised/plain ratios from the same run. Qwen2.5-0.5B shapes: random weights in the real shape
(`_gpu_check_models.py`); values do not change the speed.
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
VARIANTS = {"plain": None, "chunked": 1024}
"""Variant -> decoder.qwen.loss_chunk_rows (None: the plain path)."""


def machine(device: str) -> str:
    from loader import machine as cpu_machine

    return cpu_machine() + (f", {torch.cuda.get_device_name()}" if device == "cuda" else "")


def examples(batch: int, seed: int = 0) -> list[dict]:
    """QA examples of varied length, as the synthetic set's questions and answers."""
    import random

    rng = random.Random(seed)
    words = "red green blue small large circle square triangle star top left bottom right middle".split()
    out = []
    for _ in range(batch):
        q = "What " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + "?"
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        out.append({"prompt": q, "answer": a})
    return out


def one_variant(model_dir: str, variant: str, batch: int, seq: int, steps: int, device: str) -> dict:
    """In this process: build the decoder, time `steps` steps after one warm-up."""
    from edge_glass.config import LoraConfig, QwenConfig
    from edge_glass.decoders.qwen import QwenDecoder

    torch.manual_seed(0)
    dev = torch.device(device)
    dec = QwenDecoder(QwenConfig(model=model_dir, tune="lora", lora=LoraConfig(), max_length=seq,
                                 loss_chunk_rows=VARIANTS[variant])).to(dev)
    n_prefix = 8
    data = dec.encode_examples(examples(batch), n_prefix)
    data = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    prefix = torch.randn(batch, n_prefix, dec.width, device=dev, dtype=dec.embed_dtype, requires_grad=True)
    positions = data["attention_mask"].numel()
    useful = int(data["attention_mask"].sum())
    supervised = int((data["labels"][:, 1:] != -100).sum())

    def step() -> float:
        loss, _ = dec.batch_loss(prefix, data)
        loss.backward()
        return float(loss)

    loss = step()  # warm-up (allocator, kernels)
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
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else (_status_kb("VmHWM") - before) * 1024
    return {"variant": variant, "loss": loss, "step_s": seconds, "tokens_per_s": positions / seconds,
            "useful_tokens_per_s": useful / seconds, "useful_fraction": useful / positions,
            "supervised_fraction": supervised / positions, "peak_bytes": peak}


def _status_kb(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "qwen2.5-0.5b"], choices=["tiny", "qwen2.5-0.5b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="max_length of an example")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=None, help="where the models are built (default: a temp dir)")
    parser.add_argument("--_one", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        print(json.dumps(one_variant(args._one[0], args._one[1], args.batch, args.seq, args.steps, args.device)))
        return {}

    sys.path.insert(0, str(HERE))
    from _gpu_check_models import model_dir
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)  # the whole table, also in a log file
    console.print(f"machine: {machine(args.device)}")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="instruct-step-") as tmp:
        root = Path(args.models or tmp)
        for shape in args.shapes:
            model = model_dir(root / shape, "qwen", dry_run=shape == "tiny")
            rows = []
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--_one", str(model), variant, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            results[shape] = rows
            plain = rows[0]
            table = Table(title=f"{shape}: batch {args.batch}, up to {args.seq} tokens, LoRA, {args.device}")
            for column in ("variant", "loss", "ms/step", "tokens/s", "useful tokens/s", "useful", "supervised",
                           "step peak MB", "speed vs plain", "memory vs plain"):
                table.add_column(column, justify="left" if column == "variant" else "right")
            for r in rows:
                table.add_row(r["variant"], f"{r['loss']:.4f}", f"{1e3 * r['step_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                              f"{r['useful_tokens_per_s']:,.0f}", f"{r['useful_fraction']:.2f}",
                              f"{r['supervised_fraction']:.2f}", f"{r['peak_bytes'] / 2**20:,.0f}",
                              f"{plain['step_s'] / r['step_s']:.2f}x",
                              f"{r['peak_bytes'] / plain['peak_bytes']:.2f}x" if plain["peak_bytes"] > 0 else "-")
            console.print(table)
    return results


if __name__ == "__main__":
    main()
