"""Training FLOPs and model FLOPs utilisation (MFU).

Samples/s says how fast a run is on one machine; MFU says how much of the accelerator the run
uses, so it compares across GPUs and tells whether a speed-up is still possible. MFU is the
model's FLOPs per step over the step time, divided by the chip's dense peak:

    mfu = flops_per_step / step_seconds / peak_flops(device, dtype)

Two ways to get the FLOPs per step:

* `count_flops(fn)` runs one forward+backward under torch's `FlopCounterMode` and adds up the
  matrix products it dispatches (mm, bmm, convolutions, attention kernels). It needs no model
  knowledge, so it is the robust choice for the adapters, the Perceiver and the TRM, whose
  shapes change with the config.
* `transformer_flops_per_token` is the PaLM / Megatron formula (torchtitan's too): 6 FLOPs per
  weight per token for a trained weight (2 forward, 2 for the input gradient, 2 for the weight
  gradient), plus 12 * layers * attention width * context per token for the attention scores and
  their weighted sum (4 forward, 8 backward). A frozen weight under trainable ones (a LoRA base,
  a decoder fed by a trained connector) still passes gradients down but computes none of its
  own: 4 FLOPs per token. So a frozen base costs about 2/3 of full fine-tuning.

Both count causal attention in full (as PaLM does, and torch's counter too), although fused
kernels skip the masked half; the convention keeps MFU comparable with published figures.
Element-wise work (norms, activations, softmax, the optimizer) is not counted by either.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# Dense (no 2:4 sparsity) peak FLOP/s from NVIDIA's datasheets, in TFLOP/s. Datasheets print the
# sparse tensor-core figure first; dense is half of it. "tf32" is the fp32 matmul rate with TF32
# tensor cores allowed, "fp32" the plain CUDA-core rate. The patterns are matched in order
# against torch.cuda.get_device_name(), so the more specific names come first.
_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # H200 NVL: H200 datasheet, NVL column (BF16 1,671 sparse; TF32 835 sparse; FP32 60).
    (r"\bH200 NVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # H200 SXM ('NVIDIA H200'): H200 datasheet, SXM column (BF16 1,979 sparse; TF32 989 sparse; FP32 67).
    (r"\bH200\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0}),
    # H100 NVL: H100 datasheet, NVL column (BF16 1,671 sparse; TF32 835 sparse; FP32 60).
    (r"\bH100 NVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    # H100 PCIe: H100 datasheet, PCIe column (BF16 1,513 sparse; TF32 756 sparse; FP32 51).
    (r"\bH100 PCIe\b", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    # H100 SXM5 ('NVIDIA H100 80GB HBM3'): H100 datasheet, SXM column (BF16 1,979 sparse; TF32 989 sparse; FP32 67).
    (r"\bH100\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0}),
    # A100 40/80 GB, SXM4 and PCIe: A100 datasheet (BF16 312; TF32 156; FP32 19.5), the same for all four.
    (r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # L40S: L40S datasheet (BF16 733 sparse; TF32 366 sparse; FP32 91.6).
    (r"\bL40S\b", {"bf16": 366.5, "tf32": 183.0, "fp32": 91.6}),
    # L40: L40 datasheet (BF16 362.1 sparse; TF32 181 sparse; FP32 90.5).
    (r"\bL40\b", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    # L4: L4 datasheet (BF16 242 sparse; TF32 120 sparse; FP32 30.3).
    (r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # A10: A10 datasheet (BF16 250 sparse; TF32 125 sparse; FP32 31.2). \b keeps A100 out.
    (r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # RTX 4090: Ada whitepaper, appendix table (FP16/BF16 tensor with FP32 accumulate, what torch
    # uses: 165.2 dense, half the FP16-accumulate rate on GeForce; TF32 82.6; FP32 82.6).
    (r"\bRTX 4090\b", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
)


def peak_flops_for_name(name: str, dtype: torch.dtype, *, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` for matmuls in `dtype`; None if it is not in the table.

    `tf32` says whether fp32 matmuls may use TF32 tensor cores (torch's matmul precision "high").
    """
    if dtype in (torch.bfloat16, torch.float16):
        key = "bf16"
    elif dtype == torch.float32:
        key = "tf32" if tf32 else "fp32"
    else:
        return None
    for pattern, peaks in _PEAKS_TFLOPS:
        if re.search(pattern, name):
            return peaks[key] * 1e12
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of `device` for `dtype` matmuls, or None (CPU, or a GPU not in the table),
    in which case MFU is simply not reported."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype, tf32=tf32)


def linear_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) weights of the `nn.Linear` layers in `module`: the weights that each
    token multiplies. Embedding lookups cost no FLOPs and are left out; a tied output head is an
    `nn.Linear` over the embedding matrix and is counted (its product is the largest in a small
    LM). peft's LoRA `A`/`B` are Linears too, so they count as trainable and the base as frozen."""
    trainable = frozen = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if m.weight.requires_grad:
                trainable += m.weight.numel()
            else:
                frozen += m.weight.numel()
    return trainable, frozen


def transformer_flops_per_token(
    trainable_params: int, frozen_params: int, num_layers: int, attn_dim: int, seq_len: int
) -> float:
    """Training FLOPs per token (forward + backward) of a transformer.

    `trainable_params` / `frozen_params`: weights of the matrix products each token goes through
    (`linear_params`), split by whether they get gradients; frozen ones are assumed to lie under
    something that trains (LoRA in every layer, or a trained prefix), so gradients pass through
    them. `attn_dim`: query heads x head dim; `seq_len`: the context each token attends over.
    """
    return 6.0 * trainable_params + 4.0 * frozen_params + 12.0 * num_layers * attn_dim * seq_len


def causal_lm_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """`transformer_flops_per_token` for a transformers causal LM (peft-wrapped or not): the
    parameter split from its Linears, layers and attention width from its config."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    trainable, frozen = linear_params(model)
    attn_dim = cfg.num_attention_heads * head_dim
    return transformer_flops_per_token(trainable, frozen, cfg.num_hidden_layers, attn_dim, seq_len)


# Attention formulas, registered over torch's own: torch's registry lacks the CPU flash kernel
# that scaled_dot_product_attention uses on CPU (it would count as zero), and torch 2.11's
# formulas (the GPU box's) reject grouped-query attention (Qwen2's 14 query / 2 key-value heads),
# whose kernels broadcast the key/value heads. So key and value shapes are widened to the query's
# heads and torch's own count is applied. The formulas get shapes: FlopCounterMode maps tensors first.
def _with_query_heads(shape, query) -> tuple[int, ...]:
    return (shape[0], query[1], *shape[2:])


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, _with_query_heads(key, query), _with_query_heads(value, query))


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, _with_query_heads(key, query), _with_query_heads(value, query))


_ATTENTION_OPS = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_flops,
    "_scaled_dot_product_flash_attention": _sdpa_flops,
    "_scaled_dot_product_efficient_attention": _sdpa_flops,
    "_scaled_dot_product_cudnn_attention": _sdpa_flops,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward_flops,
    "_scaled_dot_product_flash_attention_backward": _sdpa_backward_flops,
    "_scaled_dot_product_efficient_attention_backward": _sdpa_backward_flops,
    "_scaled_dot_product_cudnn_attention_backward": _sdpa_backward_flops,
}
_ATTENTION = {op: f for name, f in _ATTENTION_OPS.items() if (op := getattr(torch.ops.aten, name, None)) is not None}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products that `fn()` runs (call it with one forward+backward).

    Only products are counted: element-wise ops, reductions and the optimizer are left out, as in
    the analytic formulas. Works on CPU and GPU, eager mode. Fused attention's backward is counted
    with the score recomputation it does (2.5x its forward, where the formula has 2x), so on
    long contexts the count reads a few per cent above `transformer_flops_per_token`.
    """
    with FlopCounterMode(display=False, custom_mapping=_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown (CPU, unlisted GPU)."""
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak
