"""Parameter counts that hold under every ZeRO stage."""

from __future__ import annotations

from typing import Iterable

import torch


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter: DeepSpeed's `ds_numel` under ZeRO-3, where each rank holds a
    partition and `numel()` of the gathered-away tensor is 0; `numel()` otherwise."""
    return int(getattr(p, "ds_numel", p.numel()))


def counts(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """(trainable, frozen) elements of `params`."""
    trainable = frozen = 0
    for p in params:
        if p.requires_grad:
            trainable += numel(p)
        else:
            frozen += numel(p)
    return trainable, frozen
