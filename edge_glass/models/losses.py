"""Symmetric InfoNCE with negatives from every rank, a clamped learnable temperature, and MRL.

Semantics follow OpenCLIP's `ClipLoss(local_loss=True, gather_with_grad=True)`: every rank
gathers the other ranks' embeddings *with* their autograd graph, scores its own rows against
the global batch, and averages. With equal per-rank batches (FeatureLoader guarantees it) the
mean of the per-rank losses equals the loss of one process on the concatenated batch, and so do
the gradients after DeepSpeed's data-parallel averaging.

Two samples with the same caption are not negatives of each other: their off-diagonal logits
are removed from the softmax, so a batch holding two renders of "a small red circle in the
center" does not push them apart.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGather(torch.autograd.Function):
    """All-gather whose backward hands each rank the gradient of its own rows, summed over the
    ranks that used them. Written here because torch 2.13 deprecates the autograd-aware
    `torch.distributed.nn.functional.all_gather` in favour of a private module."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order, keeping gradients to every rank's rows.
    Every rank must pass the same number of rows (FeatureLoader's balanced batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All ranks' integer ids (no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, ids)
    return torch.cat(out)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    a_all: torch.Tensor,
    b_all: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    group_ids_all: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows (`a`, `b`, unit-norm) against all ranks' rows.

    Row i of `a` is positive with row (offset + i) of `b_all`, where offset is this rank's start.
    Rows sharing a `group_id` (e.g. a caption hash) are masked out as negatives.
    """
    n = a.shape[0]
    offset = _rank() * n
    labels = torch.arange(n, device=a.device) + offset
    logits_ab = scale * a @ b_all.T
    logits_ba = scale * b @ a_all.T
    if group_ids is not None:
        same = group_ids[:, None] == group_ids_all[None, :]
        same[torch.arange(n, device=a.device), labels] = False  # keep the true positive
        logits_ab = logits_ab.masked_fill(same, float("-inf"))
        logits_ba = logits_ba.masked_fill(same, float("-inf"))
    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        # F.cross_entropy's label smoothing would spread mass onto the masked (-inf) logits and
        # return inf; smooth over the remaining candidates only.
        logp = logits.log_softmax(-1)
        nll = -logp.gather(1, labels[:, None]).squeeze(1)
        if not label_smoothing:
            return nll.mean()
        valid = torch.isfinite(logits)
        smooth = -logp.masked_fill(~valid, 0).sum(1) / valid.sum(1)
        return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()

    return 0.5 * (cross_entropy(logits_ab) + cross_entropy(logits_ba))


class LogitScale(nn.Module):
    """exp(s), s learnable from ln(1/temperature), clamped so exp(s) <= max_scale (CLIP)."""

    def __init__(self, temperature: float, max_scale: float, learnable: bool = True) -> None:
        super().__init__()
        self.max_log = math.log(max_scale)
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which a
        # 0-dim tensor cannot give.
        self.value = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        # Clamping in the forward pass (rather than in-place after a step, as OpenCLIP does)
        # keeps the scale bounded at every step, including the first after a resume.
        return self.value.clamp(max=self.max_log).exp().squeeze(0)


def mrl_prefixes(x: torch.Tensor, dims: list[int]) -> dict[int, torch.Tensor]:
    """Unit-norm prefixes x[:, :d] for each Matryoshka dim d."""
    return {d: F.normalize(x[:, :d].float(), dim=-1) for d in dims}
