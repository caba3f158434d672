"""The align stage as a task for the trainer: its model, its loss on a batch, its evaluation."""

from __future__ import annotations

import torch

from edge_glass.config import Config
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import FeatureSplit
from edge_glass.models.alignment import AlignmentModel, FeatureInfo
from edge_glass.training.align_eval import alignment_metrics


class AlignTask:
    """Contrastive alignment of the configured adapters (notes: DESIGN.md, training, `align`)."""

    best_metric = "val/mean_R@1"
    higher_is_better = True

    def __init__(self, cfg: Config, train_split: FeatureSplit) -> None:
        self.cfg = cfg
        self.modalities = cfg.model.adapters.enabled()
        features = {m: FeatureInfo.from_manifest(train_split.manifest, m) for m in self.modalities}
        self.model = AlignmentModel(cfg.model, cfg.loss, features)
        self.init_checkpoint = None
        self.loader_options: dict = {}
        self.logged_parts = ("logit_scale",)

    def describe(self) -> str:
        return f"contrastive pairs {', '.join(self.model.pairs)}"

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts, _ = engine(batch)
        return loss, parts

    def evaluate(self, engine, split: FeatureSplit, rank: int, world_size: int, samples_path=None,
                 zero_stage: int = 0) -> dict[str, float]:
        """Retrieval metrics on `split` (`samples_path` and `zero_stage` concern generation only)."""
        loader = FeatureLoader(
            split, self.cfg.data.eval_batch_size, modalities=self.modalities, shuffle=False, drop_last=False,
            rank=rank, world_size=world_size, block_size=self.cfg.data.read_block_size, prefetch_batches=1,
        )
        device = engine.device
        batches = (to_device(b, device) for b in loader)
        metrics = alignment_metrics(engine.module, batches, self.cfg.eval.recall_ks, self.cfg.eval.chunk_size)
        full = self.cfg.model.shared_dim
        r1 = [v for k, v in metrics.items() if f"@{full}/" in k and k.endswith("/R@1")]
        out = {f"val/{k}": v for k, v in metrics.items()}
        out[self.best_metric] = sum(r1) / max(len(r1), 1)
        return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a FeatureLoader batch (nested one level) to `device`; anything else
    (keys, captions, a quantised store's scheme name) stays as it is."""
    non_blocking = device.type == "cuda"

    def move(v):
        return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

    return {k: {kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v) for k, v in batch.items()}
