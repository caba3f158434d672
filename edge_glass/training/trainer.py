"""The training loop: DeepSpeed engine, exact resume, crash-safe checkpoints, evaluation, logging.

One loop serves both stages; the stage's task supplies the model, the loss on a batch and the
evaluation. Everything a resumed run needs to continue *exactly* is restored: module, optimizer
and scheduler (DeepSpeed), the data cursor (FeatureLoader state in the checkpoint's metadata),
and each rank's RNG.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from edge_glass.config import Config, config_fingerprint, config_to_dict, save_config
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.manifest import differences
from edge_glass.features.store import check_store_matches, open_store
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.align_task import AlignTask, to_device
from edge_glass.training.ds_config import build_ds_config, resolve_precision, zero_stage
from edge_glass.training.flops import count_flops, mfu, peak_flops
from edge_glass.training.run_log import MetricsLog, parameter_table
from edge_glass.training.schedule import lr_factor
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.progress import progress_bar

# Fields that may change between a run and its resume without changing what it computes.
RESUMABLE_FIELDS = (
    "train.max_steps", "train.epochs", "train.eval_interval", "train.save_interval", "train.keep_last",
    "train.log_interval", "train.deepspeed", "train.monitor", "data.prefetch_batches", "data.eval_batch_size",
    "data.reader_threads", "data.max_open_shards", "data.release_pages", "eval.",
    # Where the store lives may change; what it holds is checked by its fingerprint.
    "data.features_dir",
)


@dataclass
class ResumePlan:
    checkpoint: Path | None
    meta: dict
    weights_only: bool = False
    universal: bool = False


def _init_distributed() -> None:
    """Join the launcher's group, or make a one-process group for a plain `python train.py`."""
    import deepspeed

    if not D.launched():
        # DeepSpeed would otherwise try MPI discovery (and fail without mpi4py).
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled, so all ranks save the same step."""
        if D.world_size() == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)  # nccl needs device tensors
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _plan_resume(run_dir: Path, resume: str, weights_only: bool) -> ResumePlan:
    root = run_dir / "checkpoints"
    if resume == "none":
        if ckpt.latest_checkpoint(root) is not None:
            raise UserError(
                f"{run_dir} already holds checkpoints; resume it with --resume auto, or pick a new experiment.name"
            )
        return ResumePlan(None, {})
    if resume == "auto":
        path = ckpt.latest_checkpoint(root)
        if path is None:
            return ResumePlan(None, {})
    else:
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume: checkpoint directory not found: {path}")
    meta = ckpt.read_meta(path)
    universal = path.parent.name == "universal"
    return ResumePlan(path, meta, weights_only=weights_only, universal=universal)


def _prefer_universal(plan: ResumePlan, world: int) -> ResumePlan:
    """On another world size, use the universal conversion of the same step when there is one."""
    if plan.checkpoint is None or plan.universal or plan.weights_only or plan.meta["world_size"] == world:
        return plan
    converted = plan.checkpoint.parent / "universal" / plan.checkpoint.name
    if (converted / ckpt.COMPLETE).is_file():
        return ResumePlan(converted, ckpt.read_meta(converted), universal=True)
    return plan


def _check_topology(plan: ResumePlan, stage: int, world: int, run_dir: Path) -> None:
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


def _check_fingerprints(plan: ResumePlan, cfg: Config, store_fp: str) -> None:
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


def train(cfg: Config, resume: str = "auto", weights_only: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO path calls a collective torch 2.13 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor is deprecated.*", category=FutureWarning)
    _init_distributed()
    rank, world = D.rank(), D.world_size()
    run_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name

    train_split = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format, cfg.data.max_open_shards)
    val_split = open_store(cfg.data.features_dir, cfg.data.splits.val, cfg.data.store_format, cfg.data.max_open_shards)
    for split in (train_split, val_split):
        check_store_matches(split, cfg)
    store_fp = train_split.manifest["fingerprint"]
    if val_split.manifest["fingerprint"] != store_fp:
        raise UserError(f"{train_split.path} and {val_split.path} were made by different encoders; re-extract one of them")

    plan = _plan_resume(run_dir, resume, weights_only)
    _check_fingerprints(plan, cfg, store_fp)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, device.type)
    ds_cfg = build_ds_config(cfg, cfg.train.deepspeed, world, precision, run_dir)
    stage = zero_stage(ds_cfg)
    plan = _prefer_universal(plan, world)
    _check_topology(plan, stage, world, run_dir)
    if plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True

    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    D.barrier()

    torch.manual_seed(cfg.experiment.seed)  # identical initial weights on every rank
    task = _make_task(cfg, train_split, plan.meta.get("init_checkpoint"))
    model = task.model
    loader = FeatureLoader(
        train_split, cfg.data.micro_batch_size, modalities=task.modalities, seed=cfg.experiment.seed,
        rank=rank, world_size=world, block_size=cfg.data.read_block_size, window_blocks=cfg.data.shuffle_window_blocks,
        prefetch_batches=cfg.data.prefetch_batches, reader_threads=cfg.data.reader_threads, reuse_buffers=True,
        release_pages=cfg.data.release_pages, pin_memory=device.type == "cuda", **task.loader_options,
    )
    steps_per_epoch = len(loader) // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise UserError(
            f"an epoch of {len(loader)} micro-batches per rank is shorter than train.grad_accum {cfg.train.grad_accum}"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    if plan.checkpoint is not None and plan.weights_only:
        _load_weights_only(model, plan.checkpoint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg.optim)),
    )

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)
    best = {"value": None, "tag": None}
    if plan.checkpoint is not None:
        if plan.weights_only:
            for _ in range(plan.meta["step"]):
                scheduler.step()
            engine.global_steps = plan.meta["step"]
        else:
            engine.load_checkpoint(str(plan.checkpoint.parent), tag=plan.checkpoint.name, load_module_strict=False)
        loader.load_state_dict(plan.meta["loader"], reshard=plan.universal or plan.weights_only)
        same_rng = ckpt.restore_rng(plan.checkpoint)
        if not same_rng:
            torch.manual_seed(cfg.experiment.seed + 1000 * rank + plan.meta["step"])
        best = dict(plan.meta.get("best", best))
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

    meta_base = {
        "config": config_to_dict(cfg),
        "config_fingerprint": config_fingerprint(cfg),
        "store_fingerprint": store_fp,
        "encoder_fingerprint": train_split.encoder_fingerprint,
        "zero_stage": stage,
        "world_size": world,
        "precision": precision,
        "init_checkpoint": task.init_checkpoint,
    }

    def save(step: int) -> None:
        meta = {**meta_base, "step": step, "epoch": loader.epoch, "loader": loader.state_dict(), "best": best}
        ckpt.save(engine, run_dir / "checkpoints", step, client_state={"edge_glass": meta}, meta=meta)
        ckpt.prune(run_dir / "checkpoints", cfg.train.keep_last, {best["tag"]} if best["tag"] else set())

    def evaluate(step: int) -> bool:
        """Evaluate and track the best; True when this step is the new best (and must be saved)."""
        metrics = task.evaluate(engine, val_split, rank, world, samples_path=run_dir / "samples" / f"step-{step:07d}.jsonl",
                                zero_stage=stage)
        value = metrics[task.best_metric]
        improved = best["value"] is None or (value > best["value"] if task.higher_is_better else value < best["value"])
        if improved:
            best.update(value=value, tag=ckpt.tag_for(step))
        log.write({"kind": "eval", "step": step, **metrics, "best": best["value"]})
        return improved

    stop = _StopFlag()
    clean_exit = False
    step = engine.global_steps
    samples_per_micro = cfg.data.micro_batch_size * world
    window = {"loss": 0.0, "micro": 0, "wait": 0.0, "t0": time.perf_counter()}
    last_saved = step if plan.checkpoint is not None else -1
    engine.train()
    peak = peak_flops(engine.device, _compute_dtype(precision))
    flops: dict = {"per_micro": None}
    try:
        with progress_bar(f"train {cfg.experiment.name}", total_steps, unit="steps", enabled=rank == 0) as bar:
            bar.advance(step)
            while step < total_steps:
                batches = iter(loader)
                while step < total_steps:
                    t_wait = time.perf_counter()
                    batch = next(batches, None)
                    window["wait"] += time.perf_counter() - t_wait
                    if batch is None:
                        break  # end of epoch; the loader now points at the next one
                    batch = to_device(batch, engine.device)
                    if peak is not None and flops["per_micro"] is None:
                        # The first micro-step runs under FLOP counting (its own forward and
                        # backward, no extra work): the FLOPs of later micro-batches of the
                        # same shape, for MFU. Only on GPUs with a known peak.
                        out = {}
                        flops["per_micro"] = count_flops(lambda: _forward_backward(task, engine, batch, out))
                        loss, parts = out["loss"], out["parts"]
                    else:
                        loss, parts = _forward_backward(task, engine, batch)
                    lr_used = float(scheduler.get_last_lr()[0])  # the rate this step trains with
                    engine.step()
                    window["loss"] = window["loss"] + loss.detach()  # no device sync until a logged step
                    window["micro"] += 1
                    if engine.global_steps == step:
                        continue  # inside a gradient-accumulation window
                    step = engine.global_steps
                    bar.advance(1)
                    if step % cfg.train.log_interval == 0 or step == total_steps:
                        record = _log_record(step, loader.epoch, window, samples_per_micro, lr_used,
                                             {k: v for k, v in parts.items() if k in task.logged_parts}, world, engine.device,
                                             flops["per_micro"], peak)
                        utilisation = record.get("mfu")
                        bar.update(description=f"train {cfg.experiment.name} · loss {record['loss']:.4f} · "
                                               f"lr {record['lr']:.2e} · {record['samples_per_s']:,.0f} samples/s · "
                                               f"data wait {100 * record['data_wait']:.0f}%"
                                               + (f" · MFU {100 * utilisation:.1f}%" if utilisation is not None else ""))
                        log.write(record)
                        window.update(loss=0.0, micro=0, wait=0.0, t0=time.perf_counter())
                    stopping = stop.agreed(engine.device)
                    improved = False
                    if step % cfg.train.eval_interval == 0 or step == total_steps:
                        improved = evaluate(step)
                    # A new best is saved at once, so "best" always names a checkpoint on disk.
                    if improved or step % cfg.train.save_interval == 0 or step == total_steps or stopping:
                        save(step)
                        last_saved = step
                    if stopping:
                        if rank == 0:
                            print(f"stopped by signal after step {step}; checkpoint saved, resume with --resume auto")
                        clean_exit = True
                        return run_dir
        if last_saved != step:
            save(step)
        clean_exit = True
    finally:
        stop.restore()
        D.teardown(clean=clean_exit)
    return run_dir


def _log_record(step: int, epoch: int, window: dict, samples_per_micro: int, lr: float, parts: dict, world: int,
                device: torch.device, flops_per_micro: int | None, peak: float | None) -> dict:
    """The window's metrics.jsonl record; `mfu` only where the FLOPs and the device's peak are known."""
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    loss = torch.as_tensor(window["loss"], dtype=torch.float32, device=device).reshape(1) / max(window["micro"], 1)
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    utilisation = mfu(flops_per_micro * window["micro"], elapsed, peak) if flops_per_micro else None
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "loss": float(loss.item()),
        "lr": lr,
        "samples_per_s": window["micro"] * samples_per_micro / elapsed,
        "data_wait": window["wait"] / elapsed,
        **{k: float(v) for k, v in parts.items()},
        **({"mfu": utilisation} if utilisation is not None else {}),
    }


def _forward_backward(task, engine, batch: dict, out: dict | None = None):
    loss, parts = task.loss(engine, batch)
    engine.backward(loss)
    if out is not None:
        out.update(loss=loss, parts=parts)
    return loss, parts


def _compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _make_task(cfg: Config, train_split, init_checkpoint: str | None):
    """The stage's task; a resumed instruct run reuses the align checkpoint it started from."""
    if cfg.train.stage == "align":
        return AlignTask(cfg, train_split)
    from edge_glass.training.instruct_task import InstructTask

    return InstructTask(cfg, train_split, init_checkpoint)


def _load_weights_only(model: torch.nn.Module, checkpoint: Path) -> None:
    """Consolidated fp32 weights from any ZeRO stage (DeepSpeed's zero_to_fp32), into the
    module before the engine partitions it; the optimizer starts fresh."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable_missing = [k for k in missing if dict(model.named_parameters()).get(k) is not None
                         and dict(model.named_parameters())[k].requires_grad]
    if unexpected or trainable_missing:
        raise UserError(f"{checkpoint}: weights do not fit this model (missing {trainable_missing[:3]}, unexpected {unexpected[:3]})")


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl as a list of records (for notebooks and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
