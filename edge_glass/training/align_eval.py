"""Evaluate an alignment model: embed a whole split, then retrieval metrics per pair and MRL dim."""

from __future__ import annotations

import json

import torch

from edge_glass.modalities import pair_modalities
from edge_glass.models.alignment import AlignmentModel, caption_ids
from edge_glass.training.metrics import retrieval_metrics
from edge_glass.utils.distributed import gather_rows


def embed_split(model: AlignmentModel, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embeddings of every sample the loader yields, gathered from all ranks, plus caption ids."""
    emb, ids, _ = embed_labelled_split(model, batches)
    return emb, ids


@torch.no_grad()
def embed_labelled_split(model: AlignmentModel, batches, label_field: str | None = None
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """`embed_split` plus, with `label_field` and batches that carry `meta`, one label id per
    sample (a sample without the field gets an id of its own); None when no sample has one."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    ids, labels, labelled = [], [], 0
    for batch in batches:
        for k, v in model.embed(batch).items():
            parts.setdefault(k, []).append(v.float())
        ids.append(caption_ids(batch["captions"], torch.device("cpu")))
        if label_field is not None and "meta" in batch:
            values = [_label(meta, label_field) for meta in batch["meta"]]
            labelled += sum(v is not None for v in values)
            # A sample without a label is a positive of itself only.
            labels.append(caption_ids([json.dumps(v) if v is not None else f"\0{key}" for v, key in
                                       zip(values, batch["keys"])], torch.device("cpu")))
    model.train(was_training)
    # A rank can hold no evaluation sample (a split with fewer blocks than ranks); it still
    # joins every gather, with zero rows.
    names = list(model.adapters) + (["fused"] if model.fusion is not None else [])
    empty = torch.zeros(0, model.cfg.shared_dim)
    emb = {k: gather_rows(torch.cat(parts[k]) if k in parts else empty).cpu() for k in names}
    none = torch.zeros(0, dtype=torch.int64)
    caption = gather_rows(torch.cat(ids) if ids else none)
    if label_field is None:
        return emb, caption, None
    label_ids = gather_rows(torch.cat(labels) if labels else none)
    counted = gather_rows(torch.tensor([labelled], dtype=torch.int64)).sum()
    return emb, caption, label_ids if int(counted) > 0 else None


def _label(meta: str, field: str):
    return json.loads(meta).get(field) if meta else None


def alignment_metrics(model: AlignmentModel, batches, ks: list[int], chunk_size: int = 1024,
                      label_field: str | None = None) -> dict[str, float]:
    """`"<pair>@<dim>/<a>-><b>/R@1"`-style metrics for every trained pair at every MRL dim; when
    the samples' JSON carries `label_field`, the multi-positive `.../group_R@1` ones beside them."""
    emb, ids, labels = embed_labelled_split(model, batches, label_field)
    out = {}
    for pair in model.pairs:
        a, b = pair_modalities(pair)
        for d in model.eval_dims:
            metrics = retrieval_metrics(emb[a][:, :d], emb[b][:, :d], ks, chunk_size, ids, names=(a, b), labels=labels)
            out.update({f"{pair}@{d}/{k}": v for k, v in metrics.items()})
    return out
