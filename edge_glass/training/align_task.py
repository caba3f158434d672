"""The align stage as a task for the trainer: its model, its loss on a batch, its evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_glass.config import Config
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import FeatureSplit, open_store
from edge_glass.models.alignment import AlignmentModel, FeatureInfo
from edge_glass.training.align_eval import alignment_metrics
from edge_glass.training.zero_shot import ZeroShotPrompts
from edge_glass.utils.errors import UserError


class AlignTask:
    """Contrastive alignment of the configured adapters (the `align` stage; training/task.py)."""

    best_metric = "val/mean_R@1"  # the mean of eval.best_metric (R@1 or group_R@1) over pairs
    higher_is_better = True

    def __init__(self, cfg: Config, train_split: FeatureSplit, init_checkpoint: str | None = None) -> None:
        """`init_checkpoint` is part of the task signature; alignment always starts fresh."""
        self.cfg = cfg
        self.modalities = cfg.model.adapters.enabled()
        features = {m: FeatureInfo.from_manifest(train_split.manifest, m) for m in self.modalities}
        self.model = AlignmentModel(cfg.model, cfg.loss, features)
        self.init_checkpoint = None
        self.loader_options: dict = {}
        self.logged_parts = ("logit_scale",)
        self._manifest = train_split.manifest
        self._zero_shot: ZeroShotPrompts | None = None

    def describe(self) -> str:
        return f"contrastive pairs {', '.join(self.model.pairs)}"

    def tokens(self, batch: dict) -> None:
        return None  # pooled features and token grids, no sequences to count

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts, _ = engine(batch)
        return loss, parts

    def evaluate(self, engine, split: FeatureSplit, rank: int, world_size: int, samples_path=None,
                 zero_stage: int = 0) -> dict[str, float]:
        """Retrieval metrics on `split` (`samples_path` and `zero_stage` concern generation only)."""
        if self.cfg.eval.zero_shot_classes and self._zero_shot is None:
            # The prompts' text features, once: the frozen text encoder runs only here.
            self._zero_shot = ZeroShotPrompts(self.cfg, self._manifest, engine.device)
        batches = (to_device(b, engine.device) for b in eval_loader(self.cfg, split, rank, world_size))
        metrics = alignment_metrics(engine.module, batches, self.cfg.eval.recall_ks, self.cfg.eval.chunk_size,
                                    self.cfg.eval.label_field, self._zero_shot)
        full, name = self.cfg.model.shared_dim, self.cfg.eval.best_metric
        if name == "zero_shot":
            chosen = [v for k, v in metrics.items() if k.startswith("zero_shot/") and k.endswith("/top1")]
        else:
            chosen = [v for k, v in metrics.items() if f"@{full}/" in k and k.endswith(f"/{name}")]
        if not chosen:
            raise UserError(f"eval.best_metric: {name} needs samples whose JSON has eval.label_field "
                            f"({self.cfg.eval.label_field!r}) with values among the classes; {split.path} has none")
        out = {f"val/{k}": v for k, v in metrics.items()}
        out[self.best_metric] = sum(chosen) / len(chosen)
        return out


def eval_loader(cfg: Config, split: FeatureSplit, rank: int = 0, world_size: int = 1) -> FeatureLoader:
    """The split in store order, every sample once (this rank's share), in evaluation batches."""
    return FeatureLoader(
        split, cfg.data.eval_batch_size, modalities=cfg.model.adapters.enabled(), shuffle=False, drop_last=False,
        rank=rank, world_size=world_size, block_size=cfg.data.read_block_size, prefetch_batches=1,
        with_meta=cfg.eval.label_field is not None,  # labels for multi-positive retrieval
    )


def eval_batches(cfg: Config, model: torch.nn.Module, split: FeatureSplit):
    """The split's evaluation batches on the model's device (stage entry, training/task.py)."""
    device = next(model.parameters()).device
    return (to_device(b, device) for b in eval_loader(cfg, split))


def evaluate_batches(cfg: Config, model: torch.nn.Module, batches, *, num_samples_to_log: int = 0) -> tuple[dict, list]:
    """Retrieval (and, with eval.zero_shot_classes, zero-shot) metrics of a loaded model over the
    batches; nothing is logged per example."""
    zero_shot = None
    if cfg.eval.zero_shot_classes:
        manifest = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format).manifest
        zero_shot = ZeroShotPrompts(cfg, manifest, next(model.parameters()).device)
    return alignment_metrics(model, batches, cfg.eval.recall_ks, cfg.eval.chunk_size, cfg.eval.label_field, zero_shot), []


def report(cfg: Config, metrics: dict, logged: list, summary: dict, stem: Path) -> list[Path]:
    """The retrieval table and `<stem>.{json,csv,png}`."""
    from edge_glass.training.report import print_table, rows, write_reports

    rs = rows(metrics)
    n = summary["num_samples"]
    print_table(rs, f"{cfg.experiment.name} · {summary['split']} ({n} samples, chance R@1 {100 / max(n, 1):.2f}%) · "
                    f"{Path(summary['checkpoint']).name}")
    zero_shot = zero_shot_summary(metrics)
    if zero_shot:
        summary = {**summary, "zero_shot": zero_shot}
        accuracies = ", ".join(f"{m} top-{k[3:]} {100 * v:.1f}%" for m, ks in zero_shot.items() if m != "num_samples"
                               for k, v in ks.items())
        print(f"zero-shot over {len(cfg.eval.zero_shot_classes)} classes ({zero_shot['num_samples']} labelled samples): {accuracies}")
    return write_reports(rs, summary, stem)


def zero_shot_summary(metrics: dict) -> dict:
    """`zero_shot/<modality>/top<k>` metrics as {modality: {top<k>: accuracy}, num_samples: n}."""
    out: dict = {}
    for key, value in metrics.items():
        parts = key.removeprefix("val/").split("/")
        if parts[0] != "zero_shot":
            continue
        if parts[1] == "num_samples":
            out["num_samples"] = int(value)
        else:
            out.setdefault(parts[1], {})[parts[2]] = value
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a FeatureLoader batch (nested one level) to `device`; anything else
    (keys, captions, a quantised store's scheme name) stays as it is."""
    non_blocking = device.type == "cuda"

    def move(v):
        return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

    return {k: {kk: move(vv) for kk, vv in v.items()} if isinstance(v, dict) else move(v) for k, v in batch.items()}
