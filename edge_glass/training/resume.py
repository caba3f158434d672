"""Resume planning: which checkpoint a run continues from, whether it may, and restoring it.

`--resume auto` continues from the newest intact checkpoint (checkpoint.py verifies each file's
size and hash; rank 0 decides, every rank follows). A resume must compute what the original run
would have: the config may differ only in `RESUMABLE_FIELDS`, the store only in where it lives
(same store fingerprint), the topology only through a universal conversion or `--weights-only`.
Every load of a checkpoint file goes through `safe_torch_load` (no unpickled code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edge_glass.config import Config, config_to_dict
from edge_glass.features.manifest import differences
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.safe_load import safe_torch_load
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError

# Fields that may change between a run and its resume without changing what it computes.
RESUMABLE_FIELDS = (
    "train.max_steps", "train.epochs", "train.eval_interval", "train.save_interval", "train.keep_last",
    "train.log_interval", "train.deepspeed", "train.monitor", "train.on_nonfinite", "data.prefetch_batches",
    "data.eval_batch_size", "data.reader_threads", "data.max_open_shards", "data.release_pages", "data.verify",
    "eval.",
    # Where the store lives may change; what it holds is checked by its fingerprint.
    "data.features_dir",
)


@dataclass
class ResumePlan:
    checkpoint: Path | None
    meta: dict
    weights_only: bool = False
    universal: bool = False


def plan_resume(run_dir: Path, resume: str, weights_only: bool) -> ResumePlan:
    root = run_dir / "checkpoints"
    if resume == "none":
        if ckpt.latest_checkpoint(root) is not None:
            raise UserError(
                f"{run_dir} already holds checkpoints; resume it with --resume auto, or pick a new experiment.name"
            )
        return ResumePlan(None, {})
    if resume == "auto":
        # Rank 0 verifies (and moves a corrupt checkpoint aside); the others take its answer.
        name = D.broadcast_object(_intact_name(root) if D.rank() == 0 else None)
        if name is None:
            return ResumePlan(None, {})
        path = root / name
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: checkpoint directory not found: {path}")
        found = ckpt.problems(path) if D.rank() == 0 else []
        if found:
            raise UserError(f"--resume: {path} is corrupt ({found[0]}); resume from another checkpoint")
    meta = ckpt.read_meta(path)
    universal = path.parent.name == "universal"
    return ResumePlan(path, meta, weights_only=weights_only, universal=universal)


def _intact_name(root: Path) -> str | None:
    path = ckpt.intact_checkpoint(root)
    return None if path is None else path.name


def prefer_universal(plan: ResumePlan, world: int) -> ResumePlan:
    """On another world size, use the universal conversion of the same step when there is one."""
    if plan.checkpoint is None or plan.universal or plan.weights_only or plan.meta["world_size"] == world:
        return plan
    converted = plan.checkpoint.parent / "universal" / plan.checkpoint.name
    if (converted / ckpt.COMPLETE).is_file():
        return ResumePlan(converted, ckpt.read_meta(converted), universal=True)
    return plan


def check_topology(plan: ResumePlan, stage: int, world: int, run_dir: Path) -> None:
    if plan.checkpoint is None or plan.weights_only or plan.universal:
        return
    old_stage, old_world = plan.meta["zero_stage"], plan.meta["world_size"]
    if (old_stage == 3) != (stage == 3):
        raise UserError(
            f"{plan.checkpoint} was written with ZeRO-{old_stage} and this run uses ZeRO-{stage}; DeepSpeed cannot "
            "move optimizer state between ZeRO-3 and ZeRO-1/2. Resume with --weights-only (the weights, a fresh optimizer)"
        )
    if old_world != world:
        raise UserError(
            f"{plan.checkpoint} was written by {old_world} process(es) and this run has {world}; convert it with "
            f"`python -m edge_glass.training.convert {run_dir} --universal` and resume again (or use --weights-only)"
        )


def check_fingerprints(plan: ResumePlan, cfg: Config, store_fp: str) -> None:
    if plan.checkpoint is None:
        return
    changed = [
        d for d in differences(plan.meta["config"], config_to_dict(cfg))
        if not any(d == f or d.startswith(f) for f in RESUMABLE_FIELDS)
    ]
    if changed:
        raise UserError(
            f"the config differs from the one {plan.checkpoint} was trained with, in {', '.join(changed)}; "
            "undo the change or start a new run (experiment.name)"
        )
    if plan.meta["store_fingerprint"] != store_fp:
        raise UserError(
            f"the feature store changed since {plan.checkpoint} (store fingerprint {plan.meta['store_fingerprint']}, "
            f"now {store_fp}); resume on the same store or start a new run"
        )


def load_weights_only(model: torch.nn.Module, checkpoint: Path) -> None:
    """Consolidated fp32 weights from any ZeRO stage (DeepSpeed's zero_to_fp32), into the
    module before the engine partitions it; the optimizer starts fresh."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    trainable_missing = [k for k in missing if k in params and params[k].requires_grad]
    if unexpected or trainable_missing:
        raise UserError(f"{checkpoint}: weights do not fit this model (missing {trainable_missing[:3]}, unexpected {unexpected[:3]})")


def restore(plan: ResumePlan, engine, scheduler, loader, seed: int) -> None:
    """Bring the engine, the data cursor and this rank's RNG to the checkpoint's step."""
    if plan.weights_only:
        for _ in range(plan.meta["step"]):
            scheduler.step()
        engine.global_steps = plan.meta["step"]
    else:
        with safe_torch_load():
            engine.load_checkpoint(str(plan.checkpoint.parent), tag=plan.checkpoint.name, load_module_strict=False)
    loader.load_state_dict(plan.meta["loader"], reshard=plan.universal or plan.weights_only)
    if not ckpt.restore_rng(plan.checkpoint):
        torch.manual_seed(seed + 1000 * D.rank() + plan.meta["step"])
