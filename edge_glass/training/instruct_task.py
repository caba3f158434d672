"""The instruct stage as a task for the trainer: model, loss on a batch, evaluation.

The adapters start from an align run (`train.init_from`, its best checkpoint), as LLaVA's second
stage starts from its first: the decoder then learns from features that already carry the
caption's content (on the synthetic set: 84-96 % exact match from aligned adapters against
50-74 % from unaligned ones in the same time). Without `init_from` the adapters start from random weights, which is
allowed (it is the ablation) but said on rank 0.

The align run must match: the same `model` section (the adapters are rebuilt from it and loaded
by name) and features of the same encoders (the store fingerprint). The stores themselves may
differ, as LLaVA aligns on captions and tunes on instructions: the adapters' standardisation
statistics are then the align store's, the ones they were trained with. The checkpoint used is recorded in the
instruct run's checkpoints, so a resume loads the same adapters even if the align run has since
moved on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_glass.config import Config, config_to_dict
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.manifest import differences, load_manifest, manifest_encoder_fingerprint
from edge_glass.features.store import FeatureSplit
from edge_glass.models.alignment import FeatureInfo
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.align_task import to_device
from edge_glass.training.instruct_batches import InstructBatcher
from edge_glass.training.instruct_eval import instruct_metrics
from edge_glass.training.instruct_model import InstructModel
from edge_glass.training.run_loading import fp32_state_dict, load_trained_weights, resolve_checkpoint, run_config
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic


def build_instruct_model(cfg: Config, manifest: dict, init_checkpoint: str | None) -> InstructModel:
    """The instruct model with the aligned adapters of `init_checkpoint` (None: random adapters).

    `manifest` is the instruct store's train manifest. With an align checkpoint, the adapters'
    standardisation statistics come from the store the align run trained on (an align run on
    captions and an instruct run on QA may use two stores of the same encoders): the adapters'
    weights only make sense with the statistics they were trained with.
    """
    stats_manifest = manifest if init_checkpoint is None else align_manifest(Path(init_checkpoint))
    features = {m: FeatureInfo.from_manifest(stats_manifest, m) for m in cfg.model.adapters.enabled()}
    model = InstructModel(cfg, features)
    if init_checkpoint is not None:
        _load_adapters(model, Path(init_checkpoint), manifest_encoder_fingerprint(manifest))
    return model


def align_manifest(checkpoint: Path) -> dict:
    align_cfg = ckpt.read_meta(checkpoint)["config"]
    return load_manifest(align_cfg["data"]["features_dir"], align_cfg["data"]["splits"]["train"])


def resolve_init_checkpoint(cfg: Config) -> str | None:
    """The align checkpoint `train.init_from` names (its best), checked against this config."""
    if cfg.train.init_from is None:
        return None
    run = Path(cfg.train.init_from)
    if not (run / "config.yaml").is_file():
        raise UserError(f"train.init_from: {run} is not a run directory (no config.yaml); train the align stage first")
    align_cfg = run_config(run)
    if align_cfg.train.stage != "align":
        raise UserError(f"train.init_from: {run} is a {align_cfg.train.stage!r} run; it must be an align run")
    changed = differences(config_to_dict(align_cfg)["model"], config_to_dict(cfg)["model"], "model")
    if changed:
        raise UserError(
            f"train.init_from: this config's model section differs from {run}'s in {', '.join(changed)}; "
            "the adapters are loaded by name into the same architecture, so copy its model section"
        )
    return str(resolve_checkpoint(run, "best"))


def _load_adapters(model: InstructModel, checkpoint: Path, encoder_fp: str) -> None:
    """The align run's adapters; their store and this one must hold the same encoders' features
    (how each stores them, float16 or int8/int4, may differ: the model dequantises either)."""
    meta = ckpt.read_meta(checkpoint)
    theirs = meta.get("encoder_fingerprint")
    if theirs is None:  # checkpoints written before stores had an encoder fingerprint
        theirs = manifest_encoder_fingerprint(align_manifest(checkpoint))
    if theirs != encoder_fp:
        raise UserError(
            f"train.init_from: {checkpoint} was trained on features of other encoders (encoder fingerprint "
            f"{theirs}, this store {encoder_fp}); extract both stores with the same encoders"
        )
    state = {k: v for k, v in fp32_state_dict(checkpoint).items() if k.startswith("adapters.")}
    needed = [n for n, _ in model.align.named_parameters() if any(n.startswith(f"adapters.{m}.") for m in model.prefix_modalities)]
    missing = [n for n in needed if n not in state]
    if missing:
        raise UserError(f"train.init_from: {checkpoint} lacks {missing[:3]}; it does not hold these adapters")
    model.align.load_state_dict(state, strict=False)


class InstructTask:
    """Prefix tokens from the aligned adapters into a decoder trained on captions and QA."""

    best_metric = "val/exact_match"
    higher_is_better = True

    def __init__(self, cfg: Config, train_split: FeatureSplit, init_checkpoint: str | None = None) -> None:
        self.cfg = cfg
        self.init_checkpoint = init_checkpoint if init_checkpoint is not None else resolve_init_checkpoint(cfg)
        self.model = build_instruct_model(cfg, train_split.manifest, self.init_checkpoint)
        # Optional decoder hook (decoders/base.py): setup that training wants and answering does not.
        getattr(self.model.decoder, "prepare_training", lambda: None)()
        self.modalities = list(cfg.decoder.prefix_modalities)
        self.batcher = InstructBatcher(cfg, self.model.decoder)
        self.loader_options = {"with_meta": True, "transform": self.batcher.train_batch}
        self.logged_parts = self.model.decoder.logged_parts

    def describe(self) -> str:
        source = self.init_checkpoint or "random weights (train.init_from is null)"
        frozen = "frozen" if self.cfg.train.freeze_adapters else "trained"
        return f"adapters ({frozen}) from {source}"

    def tokens(self, batch: dict) -> tuple[int, int] | None:
        # Qwen's batches count their real tokens (padded or packed); the TRM's fixed-length
        # answers have no padding to leave out.
        if "num_tokens" not in batch:
            return None
        return int(batch["num_tokens"]), int(batch["input_ids"].numel())

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return engine(batch)

    def evaluate(self, engine, split: FeatureSplit, rank: int, world_size: int, samples_path: Path | None = None,
                 zero_stage: int = 0) -> dict[str, float]:
        loader = eval_loader(self.cfg, split, self.batcher, rank, world_size)
        batches = (to_device(b, engine.device) for b in loader)
        metrics, logged = instruct_metrics(
            engine.module, batches, max_new_tokens=self.cfg.eval.max_new_tokens, max_samples=self.cfg.eval.max_samples,
            num_samples_to_log=self.cfg.eval.num_samples_to_log if rank == 0 else 0,
            synced_gpus=zero_stage == 3 and world_size > 1,  # sharded weights: every rank steps every token
        )
        if rank == 0 and samples_path is not None and logged:
            samples_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in logged))
        return {f"val/{k}": v for k, v in metrics.items()}


def load_instruct_model(run_dir: str | Path, which: str = "best") -> tuple[Config, InstructModel, Path]:
    """(config, model in eval mode with the checkpoint's trained weights, checkpoint used)."""
    from edge_glass.features.store import open_store

    cfg = run_config(run_dir)
    checkpoint = resolve_checkpoint(Path(run_dir), which)
    train_split = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format)
    # The frozen parts are rebuilt as the run built them: the base decoder from its id, the
    # adapters from the align checkpoint the run started from.
    model = build_instruct_model(cfg, train_split.manifest, ckpt.read_meta(checkpoint).get("init_checkpoint"))
    load_trained_weights(model, checkpoint)
    return cfg, model.eval(), checkpoint


def eval_loader(cfg: Config, split: FeatureSplit, batcher: InstructBatcher, rank: int = 0, world_size: int = 1) -> FeatureLoader:
    """The split in order, every sample once, as evaluation batches."""
    return FeatureLoader(
        split, cfg.data.eval_batch_size, modalities=list(cfg.decoder.prefix_modalities), shuffle=False, drop_last=False,
        rank=rank, world_size=world_size, block_size=cfg.data.read_block_size, prefetch_batches=1,
        with_meta=True, transform=batcher.eval_batch,
    )


def eval_batches(cfg: Config, model: InstructModel, split: FeatureSplit):
    """The split's evaluation batches on the model's device (stage entry, training/task.py)."""
    device = next(model.parameters()).device
    return (to_device(b, device) for b in eval_loader(cfg, split, InstructBatcher(cfg, model.decoder)))


def evaluate_batches(cfg: Config, model: InstructModel, batches, *, num_samples_to_log: int = 0) -> tuple[dict, list]:
    """(QA metrics, logged generations) of a loaded model over the batches."""
    return instruct_metrics(model, batches, max_new_tokens=cfg.eval.max_new_tokens, max_samples=cfg.eval.max_samples,
                            num_samples_to_log=num_samples_to_log)


def report(cfg: Config, metrics: dict, logged: list, summary: dict, stem: Path) -> list[Path]:
    """The QA table, `<stem>.json` and the generations in `<stem>-samples.jsonl`."""
    from edge_glass.training.instruct_report import print_qa_table, write_qa_reports

    print_qa_table(metrics, f"{cfg.experiment.name} · {summary['split']} · {int(metrics['num_examples'])} examples · "
                            f"{Path(summary['checkpoint']).name}")
    return write_qa_reports(metrics, logged, summary, stem)
