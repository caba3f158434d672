"""Evaluate an alignment model: embed a whole split, then retrieval metrics per pair and MRL dim
(strict, and multi-positive when samples carry labels) and zero-shot classification."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import torch

from edge_glass.modalities import PERCEPTUAL, pair_modalities
from edge_glass.models.alignment import AlignmentModel, caption_ids
from edge_glass.training.metrics import retrieval_metrics
from edge_glass.training.zero_shot import ZeroShotPrompts, zero_shot_metrics
from edge_glass.utils.distributed import gather_rows


@dataclass
class SplitEmbeddings:
    """A split's embeddings, gathered from every rank in store order, with what scores them."""

    emb: dict[str, torch.Tensor]
    """Per modality (and `fused`), [N, D] un-normalised embeddings."""
    caption_ids: torch.Tensor
    """[N] ids of the captions (identical captions share one)."""
    label_ids: torch.Tensor | None
    """[N] ids of the samples' labels (an unlabelled sample has one of its own); None: no labels."""
    class_index: torch.Tensor | None
    """[N] index of the sample's label among the zero-shot class names, -1 if not one of them."""


def embed_split(model: AlignmentModel, batches) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Embeddings of every sample the loader yields, gathered from all ranks, plus caption ids."""
    split = embed_labelled_split(model, batches)
    return split.emb, split.caption_ids


@torch.no_grad()
def embed_labelled_split(model: AlignmentModel, batches, label_field: str | None = None,
                         class_names: Sequence[str] = ()) -> SplitEmbeddings:
    """`embed_split` plus, with `label_field` and batches that carry `meta`, the samples' label
    ids and their class indices among `class_names`."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    ids, labels, classes, labelled = [], [], [], 0
    index = {name: i for i, name in enumerate(class_names)}
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
            classes.append(torch.tensor([index.get(str(v), -1) if v is not None else -1 for v in values],
                                        dtype=torch.int64))
    model.train(was_training)
    # A rank can hold no evaluation sample (a split with fewer blocks than ranks); it still
    # joins every gather, with zero rows.
    names = list(model.adapters) + (["fused"] if model.fusion is not None else [])
    empty = torch.zeros(0, model.cfg.shared_dim)
    emb = {k: gather_rows(torch.cat(parts[k]) if k in parts else empty).cpu() for k in names}
    none = torch.zeros(0, dtype=torch.int64)
    caption = gather_rows(torch.cat(ids) if ids else none)
    if label_field is None:
        return SplitEmbeddings(emb, caption, None, None)
    label_ids = gather_rows(torch.cat(labels) if labels else none)
    class_index = gather_rows(torch.cat(classes) if classes else none)
    counted = int(gather_rows(torch.tensor([labelled], dtype=torch.int64)).sum())
    return SplitEmbeddings(emb, caption, label_ids if counted else None, class_index if counted else None)


def _label(meta: str, field: str):
    """The value at `field` (a dotted path into nested objects) of a sample's JSON, None if absent."""
    value = json.loads(meta) if meta else None
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def alignment_metrics(model: AlignmentModel, batches, ks: list[int], chunk_size: int = 1024,
                      label_field: str | None = None, zero_shot: "ZeroShotPrompts | None" = None) -> dict[str, float]:
    """`"<pair>@<dim>/<a>-><b>/R@1"`-style metrics for every trained pair at every MRL dim; when
    the samples' JSON carries `label_field`, the multi-positive `.../group_R@1` ones beside them,
    and with `zero_shot` prompts, `zero_shot/<modality>/top1` and `top5`."""
    split = embed_labelled_split(model, batches, label_field, zero_shot.class_names if zero_shot else ())
    emb, ids, labels = split.emb, split.caption_ids, split.label_ids
    out = {}
    for pair in model.pairs:
        a, b = pair_modalities(pair)
        for d in model.eval_dims:
            metrics = retrieval_metrics(emb[a][:, :d], emb[b][:, :d], ks, chunk_size, ids, names=(a, b), labels=labels)
            out.update({f"{pair}@{d}/{k}": v for k, v in metrics.items()})
    if zero_shot is not None and split.class_index is not None:
        queries = [m for m in model.adapters if m in PERCEPTUAL]
        out.update(zero_shot_metrics(emb, split.class_index, zero_shot.class_embeddings(model), queries))
    return out
