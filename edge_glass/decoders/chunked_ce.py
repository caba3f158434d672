"""Cross-entropy of a linear head without the full logits: the LM loss of the supervised tokens.

The plain path computes logits for every position of the batch ([B, L, V]: 16 x 256 x 151,936
floats is 2.5 GB in fp32 for Qwen2.5's vocabulary) and then a loss over the few positions that
carry a label (the answer: a prompt, the prefix slots and the padding carry none). Here only the
supervised rows' hidden states go to the head, in chunks of `chunk_rows` rows, and each chunk's
gradients (with respect to the hidden states and, when it is trained, the head's weight) are
computed right away in the forward pass, as Liger's fused linear cross-entropy does on CUDA: at
no point are more than [chunk_rows, V] logits alive, and nothing of them is kept for backward.

The result is the same mean cross-entropy and the same gradients as `F.cross_entropy(h @ W.T,
y)` up to floating-point summation order (tested). As Hugging Face's causal-LM loss, the head's
product runs in the model's dtype and the softmax in float32; the gradients come back in the
inputs' dtypes. A frozen head (LoRA) gets no gradient and is never copied.

Hand-written because no maintained library installable here does it on CPU and for any dtype:
Liger's kernel is Triton (CUDA only), and torch has no fused linear cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_glass.decoders.base import IGNORE_INDEX

DEFAULT_CHUNK_ROWS = 1024
"""Rows of logits alive at once: 1024 x 151,936 fp32 = 0.6 GB for Qwen's vocabulary."""


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                weight_grad: bool) -> torch.Tensor:
        # The dtypes below are chosen by hand; an enclosing autocast would turn the float32
        # products (the head's gradient, the softmax's input) back into bf16.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_rows, weight_grad)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_rows: int, weight_grad: bool) -> torch.Tensor:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        # A trainable head's gradient accumulates in float32 ([V, H], what its .grad needs anyway);
        # a frozen one (LoRA) gets none, and no float32 copy of it is ever made.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight_grad else None
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows].to(weight.dtype)
            y = targets[start : start + chunk_rows]
            # As Hugging Face's loss: the head in the model's dtype, the loss in float32.
            logits = (h @ weight.T).float()  # [c, V], the only logits alive
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            # d(sum of losses)/d logits = softmax - one_hot; the mean's 1/n is applied in backward.
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h.float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output / max(ctx.n, 1)
        gh = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        gw = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of `hidden` [N, H] through the head `weight` [V, H] against `targets`
    [N] (rows labelled IGNORE_INDEX are dropped first); a scalar, 0 with a gradient of zeros
    when no row is labelled."""
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, weight.requires_grad)


def supervised_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal-LM shift, keeping only supervised positions: hidden states [B, L, H] that
    predict a labelled next token, as [N, H], with those tokens [N]. What a language model's loss
    reads; the prompt's and padding's positions never reach the head."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    return hidden[:, :-1][keep], shifted[keep]


def full_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path, for comparison: every logit at once (the head in the model's dtype, the
    loss in float32, as Hugging Face computes it)."""
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)
