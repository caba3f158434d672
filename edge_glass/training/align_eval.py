"""Evaluate an alignment model: embed a whole split, then retrieval metrics per pair and MRL dim."""

from __future__ import annotations

import torch

from edge_glass.modalities import pair_modalities
from edge_glass.models.alignment import AlignmentModel, caption_ids
from edge_glass.training.metrics import retrieval_metrics
from edge_glass.utils.distributed import gather_rows


@torch.no_grad()
def embed_split(model: AlignmentModel, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embeddings of every sample the loader yields, gathered from all ranks, plus caption ids."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    ids = []
    for batch in batches:
        for k, v in model.embed(batch).items():
            parts.setdefault(k, []).append(v.float())
        ids.append(caption_ids(batch["captions"], torch.device("cpu")))
    model.train(was_training)
    # A rank can hold no evaluation sample (a split with fewer blocks than ranks); it still
    # joins every gather, with zero rows.
    names = list(model.adapters) + (["fused"] if model.fusion is not None else [])
    empty = torch.zeros(0, model.cfg.shared_dim)
    emb = {k: gather_rows(torch.cat(parts[k]) if k in parts else empty).cpu() for k in names}
    return emb, gather_rows(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64))


def alignment_metrics(model: AlignmentModel, batches, ks: list[int], chunk_size: int = 1024) -> dict[str, float]:
    """`"<pair>@<dim>/<a>-><b>/R@1"`-style metrics for every trained pair at every MRL dim."""
    emb, ids = embed_split(model, batches)
    out = {}
    for pair in model.pairs:
        a, b = pair_modalities(pair)
        for d in model.eval_dims:
            metrics = retrieval_metrics(emb[a][:, :d], emb[b][:, :d], ks, chunk_size, ids, names=(a, b))
            out.update({f"{pair}@{d}/{k}": v for k, v in metrics.items()})
    return out
