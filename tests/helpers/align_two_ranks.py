"""One rank of the two-rank AlignmentModel check (tests/test_alignment_learning.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/align_two_ranks.py OUT

Every rank builds the same model (same seed) and takes its half of one fixed global batch,
re-padded to its own longest sequence as FeatureLoader would pad it. It computes the loss,
backpropagates, then averages the gradients over ranks (what DeepSpeed's data parallelism does)
and rank 0 saves {"loss": mean of the ranks' losses, "grads": {name: averaged grad}} to OUT.

The test imports `build_model`, `global_batch`, `half` and `grads` from here to compute the
one-process reference on the whole batch.
"""

from __future__ import annotations

import sys

import torch

from edge_glass.config import AdapterConfig, AdaptersConfig, LossConfig, ModelConfig, PairWeightsConfig
from edge_glass.models.alignment import AlignmentModel, FeatureInfo

WIDTHS = {"vision": (12, 9), "audio": (10, 6), "text": (8, 7)}  # (token width, pooled width)
GLOBAL_BATCH = 8
MAX_LEN = {"vision": 5, "audio": 9, "text": 4}
# Row 6 (second half) repeats row 1's caption (first half): a same-caption pair across ranks.
CAPTIONS = ["red circle", "blue square", "green star", "red square", "pink circle", "blue star", "blue square", "grey moon"]


def build_model(seed: int = 0, mrl_weights: list[float] | None = None) -> AlignmentModel:
    g = torch.Generator().manual_seed(seed)
    info = {
        m: FeatureInfo(
            torch.randn(e, generator=g), torch.rand(e, generator=g) + 0.5,
            torch.randn(p, generator=g), torch.rand(p, generator=g) + 0.5,
        )
        for m, (e, p) in WIDTHS.items()
    }
    adapters = AdaptersConfig(
        vision=AdapterConfig("attn_pool", hidden_dim=16, num_heads=2),
        audio=AdapterConfig("perceiver", hidden_dim=16, num_heads=2, num_latents=3, depth=1),
        text=AdapterConfig("mlp", hidden_dim=16),
    )
    model_cfg = ModelConfig(shared_dim=16, adapters=adapters, mrl_dims=[4, 8], mrl_weights=mrl_weights, fusion="gated")
    pairs = PairWeightsConfig(vision_text=1.0, audio_text=0.5, vision_audio=0.25, fused_text=0.75)
    torch.manual_seed(seed)
    model = AlignmentModel(model_cfg, LossConfig(pairs=pairs), info)
    with torch.no_grad():  # a non-default scale, so its gradient is not a special case
        model.logit_scale.value.fill_(2.0)
    return model


def global_batch(seed: int = 1) -> dict:
    """FeatureLoader-shaped batch of GLOBAL_BATCH rows with variable token lengths (>= 1)."""
    g = torch.Generator().manual_seed(seed)
    batch: dict = {"keys": [f"k{i}" for i in range(GLOBAL_BATCH)], "captions": list(CAPTIONS), "meta": ["{}"] * GLOBAL_BATCH}
    for m, (e, p) in WIDTHS.items():
        lengths = torch.randint(1, MAX_LEN[m] + 1, (GLOBAL_BATCH,), generator=g)
        lengths[0] = 1
        lengths[-1] = MAX_LEN[m]  # only the second half reaches the longest length
        T = int(lengths.max())
        mask = torch.arange(T)[None, :] < lengths[:, None]
        tokens = (torch.randn(GLOBAL_BATCH, T, e, generator=g) * mask.unsqueeze(-1)).half()
        batch[m] = {"tokens": tokens, "mask": mask, "pooled": torch.randn(GLOBAL_BATCH, p, generator=g).half()}
    return batch


def half(batch: dict, rank: int, world: int) -> dict:
    """This rank's rows, padded only as far as its own longest sequence."""
    n = len(batch["keys"]) // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {k: batch[k][rows] for k in ("keys", "captions", "meta")}
    for m in WIDTHS:
        mask = batch[m]["mask"][rows]
        T = int(mask.sum(dim=1).max())
        out[m] = {
            "tokens": batch[m]["tokens"][rows, :T].clone(),
            "mask": mask[:, :T].clone(),
            "pooled": batch[m]["pooled"][rows].clone(),
        }
    return out


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.grad is None:
                raise AssertionError(f"{name} got no gradient")
            out[name] = p.grad.detach().clone()
    return out


def main(out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model = build_model()
        loss, _, _ = model(half(global_batch(), rank, world))
        loss.backward()
        g = grads(model)
        for t in g.values():  # DeepSpeed/DDP data parallel: average the gradients over ranks
            dist.all_reduce(t)
            t /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        if rank == 0:
            torch.save({"loss": mean_loss, "grads": g, "world_size": world}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
