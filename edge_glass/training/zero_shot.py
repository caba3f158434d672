"""Zero-shot classification, as CLIP and clip_benchmark score it: class names become text
prompts (`eval.zero_shot_templates`), each class is the mean of its prompts' embeddings (prompt
ensembling), and an image or clip is assigned the class whose embedding is nearest.

During training the prompts' text features are computed once, with the frozen text encoder the
store was made with (features/raw_features.py); each evaluation runs them through the current
text adapter. A sample's true class is its raw JSON's `eval.label_field`; samples whose label is
not among the class names are left out of the accuracy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from edge_glass.config import DEFAULT_TEMPLATES, Config
from edge_glass.features.raw_features import checked_encoder, features_of, raw_sample
from edge_glass.modalities import TEXT
from edge_glass.utils.errors import UserError


__all__ = ["DEFAULT_TEMPLATES", "ZeroShotPrompts", "check_templates", "class_embeddings", "zero_shot_metrics"]


def check_templates(templates: Sequence[str]) -> None:
    if not templates or any("{}" not in t for t in templates):
        raise UserError(f"zero-shot templates must each hold '{{}}' where the class name goes, got {list(templates)}")


def prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    check_templates(templates)
    return [t.format(name) for name in class_names for t in templates]


def class_embeddings(embed_texts: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """[C, D] unit vectors: per class, the normalised mean of its templates' text embeddings."""
    emb = embed_texts(prompts(class_names, templates)).reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


class ZeroShotPrompts:
    """The configured classes' prompt features, encoded once by the frozen text encoder."""

    def __init__(self, cfg: Config, manifest: dict, device: torch.device) -> None:
        self.class_names = list(cfg.eval.zero_shot_classes)
        self.templates = list(cfg.eval.zero_shot_templates)
        texts = prompts(self.class_names, self.templates)
        encoder = checked_encoder(cfg, manifest, TEXT, device)
        self.features = features_of(encoder, TEXT, [raw_sample(f"prompt {i}", caption=t) for i, t in enumerate(texts)])

    @torch.no_grad()
    def class_embeddings(self, model) -> torch.Tensor:
        """[C, D] class embeddings through `model`'s current text adapter."""
        device = next(model.parameters()).device

        def embed(_texts: list[str]) -> torch.Tensor:
            feats = {k: v.to(device) for k, v in self.features.items()}
            return F.normalize(model.adapters[TEXT](feats).float(), dim=-1).cpu()

        return class_embeddings(embed, self.class_names, self.templates)


def zero_shot_metrics(emb: dict[str, torch.Tensor], class_index: torch.Tensor, classes: torch.Tensor,
                      modalities: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`zero_shot/<modality>/top<k>` accuracy over the samples with a known class (index >= 0)."""
    known = class_index >= 0
    if not bool(known.any()):
        return {}
    out = {}
    for m in modalities:
        scores = F.normalize(emb[m][known].float(), dim=-1) @ classes.T
        truth = class_index[known]
        for k in ks:
            if k > classes.shape[0]:
                continue
            hit = (scores.topk(k, dim=1).indices == truth[:, None]).any(dim=1)
            out[f"zero_shot/{m}/top{k}"] = float(hit.double().mean())
    out["zero_shot/num_samples"] = float(known.sum())
    return out
