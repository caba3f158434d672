"""Load a finished (or running) run's trained modules for evaluation, export and notebooks.

Weights come from DeepSpeed's `zero_to_fp32` consolidation, which reads any ZeRO stage and any
world size, so evaluation needs neither the engine nor a process group.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_glass.config import Config, load_config
from edge_glass.features.store import open_store
from edge_glass.models.alignment import AlignmentModel, FeatureInfo
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.safe_load import safe_torch_load
from edge_glass.utils.errors import UserError


def run_config(run_dir: str | Path) -> Config:
    """The config a run directory was trained with; a UserError if it is not a run directory."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); train one with: "
                        "python scripts/train.py --config <config>")
    return load_config(path)


def load_trained_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """The checkpoint's trained weights into `model`. A checkpoint holds every trainable
    parameter; what it leaves out (frozen parameters and tied copies, rebuilt from the config;
    standardisation buffers, from the manifest) may be missing. Any trainable parameter missing,
    or any weight the model lacks, is refused."""
    try:
        missing, unexpected = model.load_state_dict(fp32_state_dict(checkpoint), strict=False)
    except RuntimeError as e:  # shape mismatches: the code's defaults changed since the run
        lines = str(e).splitlines()
        raise UserError(f"{checkpoint}: weights do not fit the run's model ({(lines[1] if len(lines) > 1 else lines[0]).strip()})") from None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in missing if k in trainable]
    if unexpected or missing:
        raise UserError(f"{checkpoint}: weights do not fit the run's model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def resolve_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """`best`, `latest`, or a checkpoint directory."""
    root = Path(run_dir) / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    if which in ("best", "latest"):
        if latest is None:
            raise UserError(f"{run_dir} has no complete checkpoint; train it with: python scripts/train.py --config <config>")
        if which == "latest":
            return latest
        tag = ckpt.read_meta(latest).get("best", {}).get("tag")
        return root / tag if tag and (root / tag / ckpt.COMPLETE).is_file() else latest
    path = Path(which)
    ckpt.read_meta(path)  # refuses incomplete checkpoints
    return path


def fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's trained weights, consolidated to fp32 (any ZeRO stage); refuses a
    checkpoint whose files no longer match meta.json, or whose pickles reference code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    found = ckpt.problems(checkpoint)
    if found:
        raise UserError(f"{checkpoint} is corrupt ({found[0]}); use another checkpoint (--checkpoint)")
    with safe_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def load_alignment_model(run_dir: str | Path, which: str = "best") -> tuple[Config, AlignmentModel, Path]:
    """(config, model in eval mode with trained weights, checkpoint used)."""
    cfg = run_config(run_dir)
    checkpoint = resolve_checkpoint(Path(run_dir), which)
    train_split = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format)
    features = {m: FeatureInfo.from_manifest(train_split.manifest, m) for m in cfg.model.adapters.enabled()}
    model = AlignmentModel(cfg.model, cfg.loss, features)
    load_trained_weights(model, checkpoint)
    return cfg, model.eval(), checkpoint
