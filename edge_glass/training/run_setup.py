"""Everything a training run needs before its first step: process group, checked store, resume
plan, task, loader and DeepSpeed engine, built once into a `RunSetup` that the loop reads.

The order matters: the store is opened and checked (encoders, file sizes or sha256) before
anything is built, so a wrong store fails in seconds, not hours in; the resume plan is made before
the engine (its fingerprints and topology decide whether to resume at all); the config is saved
before the first step; weights are initialised from one seed on every rank, dropout streams
from a per-rank seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_glass.config import Config, config_fingerprint, config_to_dict, save_config
from edge_glass.features.integrity import verify_split_files
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import FeatureSplit, open_checked_split
from edge_glass.training import resume as R
from edge_glass.training.ds_config import build_ds_config, resolve_precision, zero_stage
from edge_glass.training.run_log import MetricsLog, parameter_table
from edge_glass.training.schedule import lr_factor
from edge_glass.training.task import Task, make_task
from edge_glass.training.tracking import Tracker, monitor_sections
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.ports import free_port


def init_distributed() -> None:
    """Join the launcher's group, or make a one-process group for a plain `python train.py`."""
    import deepspeed

    if not D.launched():
        # DeepSpeed would otherwise try MPI discovery (and fail without mpi4py).
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)


@dataclass
class RunSetup:
    """Everything the loop needs, built once."""

    cfg: Config
    run_dir: Path
    task: Task
    engine: object
    scheduler: object
    loader: FeatureLoader
    val_split: FeatureSplit
    log: MetricsLog
    total_steps: int
    stage: int
    precision: str
    meta_base: dict
    resumed: bool
    best: dict = field(default_factory=lambda: {"value": None, "tag": None})


def setup_run(cfg: Config, run_dir: Path, resume: str, weights_only: bool) -> RunSetup:
    import deepspeed

    rank, world = D.rank(), D.world_size()
    train_split, val_split = open_checked_split(cfg, cfg.data.splits.train), open_checked_split(cfg, cfg.data.splits.val)
    for split in (train_split, val_split):
        # Before step 1, not hours in: a truncated or replaced shard (sizes always, sha256 with
        # data.verify: sha256; ranks split the files).
        verify_split_files(split, cfg.data.verify, rank, world)
    store_fp = train_split.manifest["fingerprint"]
    if val_split.manifest["fingerprint"] != store_fp:
        raise UserError(f"{train_split.path} and {val_split.path} were made by different encoders; re-extract one of them")

    plan = R.plan_resume(run_dir, resume, weights_only)
    R.check_fingerprints(plan, cfg, store_fp)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, device.type)
    ds_cfg = build_ds_config(cfg, cfg.train.deepspeed, world, precision, run_dir)
    monitors = monitor_sections(cfg.train.monitor, ds_cfg, run_dir, cfg.train.wandb_project)
    stage = zero_stage(ds_cfg)
    plan = R.prefer_universal(plan, world)
    R.check_topology(plan, stage, world, run_dir)
    if plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True

    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()

    torch.manual_seed(cfg.experiment.seed)  # identical initial weights on every rank
    task = make_task(cfg, train_split, plan.meta.get("init_checkpoint"))
    model = task.model
    loader = _train_loader(cfg, train_split, task, device)
    steps_per_epoch = len(loader) // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"an epoch of {len(loader)} micro-batches per rank is shorter than train.grad_accum {cfg.train.grad_accum}"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    if plan.checkpoint is not None and plan.weights_only:
        R.load_weights_only(model, plan.checkpoint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg.optim)),
    )
    resumed = plan.checkpoint is not None
    tracker = Tracker(monitors, run_dir, resume_step=plan.meta["step"] if resumed else 0, resumed=resumed)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0, tracker=tracker)
    setup = RunSetup(
        cfg, run_dir, task, engine, scheduler, loader, val_split, log, total_steps, stage, precision,
        meta_base={
            "config": config_to_dict(cfg),
            "config_fingerprint": config_fingerprint(cfg),
            "store_fingerprint": store_fp,
            "encoder_fingerprint": train_split.encoder_fingerprint,
            "zero_stage": stage,
            "world_size": world,
            "precision": precision,
            "init_checkpoint": task.init_checkpoint,
        },
        resumed=resumed,
    )
    if plan.checkpoint is not None:
        R.restore(plan, engine, scheduler, loader, cfg.experiment.seed)
        setup.best = dict(plan.meta.get("best", setup.best))
        log.truncate_after(plan.meta["step"])
        if rank == 0:
            print(f"resumed from {plan.checkpoint} at step {plan.meta['step']}"
                  + (" (weights only, fresh optimizer)" if plan.weights_only else ""))
    else:
        torch.manual_seed(cfg.experiment.seed + 1000 * rank)  # per-rank dropout streams
        log.truncate_after(0)  # a run killed before its first checkpoint starts its log afresh
        if rank == 0:
            print(f"{cfg.train.stage} stage: {task.describe()}")
            parameter_table(model.parameter_table(), run_dir)
    return setup


def _train_loader(cfg: Config, split: FeatureSplit, task: Task, device: torch.device) -> FeatureLoader:
    """This rank's shuffled share of the train split, in reused (pinned on a GPU) buffers."""
    return FeatureLoader(
        split, cfg.data.micro_batch_size, modalities=task.modalities, seed=cfg.experiment.seed,
        rank=D.rank(), world_size=D.world_size(), block_size=cfg.data.read_block_size,
        window_blocks=cfg.data.shuffle_window_blocks, prefetch_batches=cfg.data.prefetch_batches,
        reader_threads=cfg.data.reader_threads, reuse_buffers=True, release_pages=cfg.data.release_pages,
        pin_memory=device.type == "cuda", **task.loader_options,
    )
