"""`AlignmentModel`: the align stage's trainable modules and its loss.

Builds only the adapters the config names (plus fusion when asked), embeds a FeatureLoader
batch into the shared space, and returns the weighted sum of symmetric InfoNCE losses over the
configured pairs at every Matryoshka dim.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_glass.config import LossConfig, ModelConfig
from edge_glass.modalities import pair_modalities
from edge_glass.models.adapters import ModalityAdapter
from edge_glass.models.fusion import FUSIONS
from edge_glass.models.losses import LogitScale, gather_ids, gather_with_grad, info_nce, mrl_prefixes
from edge_glass.utils.params import counts


@dataclass
class FeatureInfo:
    """What an adapter needs to know about one modality's stored features."""

    token_mean: torch.Tensor
    token_std: torch.Tensor
    pooled_mean: torch.Tensor
    pooled_std: torch.Tensor
    max_tokens: int | None = None
    """Longest token sequence of the split (the flat adapter's input length)."""

    @classmethod
    def from_manifest(cls, manifest: dict, modality: str) -> "FeatureInfo":
        """Statistics of the *train* split's manifest (adapters standardise with train stats)."""
        stats = manifest["stats"]

        def t(field: str, key: str) -> torch.Tensor:
            return torch.tensor(np.asarray(stats[f"{modality}.{field}"][key], dtype=np.float32))

        max_tokens = manifest.get("fields", {}).get(f"{modality}.tokens", {}).get("max_length")
        return cls(t("tokens", "mean"), t("tokens", "std"), t("pooled", "mean"), t("pooled", "std"), max_tokens)


def caption_ids(captions: list[str], device: torch.device) -> torch.Tensor:
    """Stable 63-bit ids of captions, equal across processes (Python's hash() is salted)."""
    ids = [int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") >> 1 for c in captions]
    return torch.tensor(ids, dtype=torch.int64, device=device)


class AlignmentModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, features: dict[str, FeatureInfo]) -> None:
        super().__init__()
        self.cfg, self.loss_cfg = model_cfg, loss_cfg
        dim = model_cfg.shared_dim
        self.adapters = nn.ModuleDict()
        for m in model_cfg.adapters.enabled():
            info = features[m]
            self.adapters[m] = ModalityAdapter(
                getattr(model_cfg.adapters, m), (info.token_mean, info.token_std), (info.pooled_mean, info.pooled_std), dim,
                info.max_tokens,
            )
        self.fusion = FUSIONS[model_cfg.fusion](dim) if model_cfg.fusion != "none" else None
        self.logit_scale = LogitScale(model_cfg.temperature_init, model_cfg.max_logit_scale, model_cfg.learn_temperature)
        self.dims = model_cfg.nested_dims() if loss_cfg.mrl else [dim]
        # Evaluation always measures every prefix, so a model trained without MRL shows what
        # truncating an ordinary embedding costs (the MRL ablation's baseline).
        self.eval_dims = model_cfg.nested_dims()
        weights = model_cfg.mrl_weights if (loss_cfg.mrl and model_cfg.mrl_weights) else [1.0] * len(self.dims)
        self.dim_weights = dict(zip(self.dims, weights))
        self.pairs = loss_cfg.pairs.active()

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """Un-normalised shared-space embeddings per modality (and `fused` with fusion)."""
        out = {m: adapter(batch[m]) for m, adapter in self.adapters.items()}
        if self.fusion is not None:
            out["fused"] = self.fusion(out["vision"], out["audio"])
        return out

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(total loss, per-term values for logging as detached tensors, embeddings).

        The terms stay tensors: turning them into Python floats here would force a device sync
        per pair and dim on every step; the trainer converts only the steps it logs."""
        emb = self.embed(batch)
        device = next(iter(emb.values())).device
        ids = caption_ids(batch["captions"], device)
        ids_all = gather_ids(ids)
        gathered = {k: gather_with_grad(v) for k, v in emb.items() if any(k in pair_modalities(p) for p in self.pairs)}
        scale = self.logit_scale()
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        for pair, weight in self.pairs.items():
            a, b = pair_modalities(pair)
            pa, pb = mrl_prefixes(emb[a], self.dims), mrl_prefixes(emb[b], self.dims)
            pa_all, pb_all = mrl_prefixes(gathered[a], self.dims), mrl_prefixes(gathered[b], self.dims)
            for d in self.dims:
                loss = info_nce(pa[d], pb[d], scale, pa_all[d], pb_all[d], ids, ids_all, self.loss_cfg.label_smoothing)
                total = total + weight * self.dim_weights[d] * loss
                parts[f"loss/{pair}@{d}"] = loss.detach()
        parts["logit_scale"] = scale.detach()
        return total, parts, emb

    def parameter_table(self) -> list[tuple[str, int, int]]:
        """(module, trainable, frozen) parameter counts per top-level module (DeepSpeed's full
        counts under ZeRO-3, not the rank's partition)."""
        rows = []
        for name, module in self.named_children():
            if isinstance(module, nn.ModuleDict):
                rows += [(f"{name}.{sub}", *counts(child.parameters())) for sub, child in module.items()]
            else:
                rows.append((name, *counts(module.parameters())))
        return rows
