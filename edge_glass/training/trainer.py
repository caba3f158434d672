"""The training loop: DeepSpeed engine, exact resume, crash-safe checkpoints, evaluation, logging.

One loop serves both stages; the stage's task supplies the model, the loss on a batch and the
evaluation. Everything a resumed run needs to continue *exactly* is restored: module, optimizer
and scheduler (DeepSpeed), the data cursor (FeatureLoader state in the checkpoint's metadata),
and each rank's RNG (resume.py). `train` is three parts: `_setup` (store, resume plan, engine),
`_Loop` (steps, logs, evaluations, checkpoints) and the teardown; run_guards.py says what stops
a run (signals, a vanished launcher, a non-finite loss), and one writer holds the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from edge_glass.config import Config, config_fingerprint, config_to_dict, save_config
from edge_glass.features.integrity import verify_split_files
from edge_glass.features.loader import FeatureLoader
from edge_glass.features.store import FeatureSplit, check_store_matches, open_store
from edge_glass.training import checkpoint as ckpt
from edge_glass.training import resume as R
from edge_glass.training.align_task import AlignTask, to_device
from edge_glass.training.ds_config import build_ds_config, resolve_precision, zero_stage
from edge_glass.training.flops import count_flops, mfu, peak_flops
from edge_glass.training.run_guards import LauncherWatch, NonFiniteLoss, StepChecks, StopFlag, params_finite
from edge_glass.training.run_log import MetricsLog, parameter_table
from edge_glass.training.schedule import lr_factor
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.locks import hold_collectively
from edge_glass.utils.progress import progress_bar

def train(cfg: Config, resume: str = "auto", weights_only: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO path calls a collective torch 2.13 deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor is deprecated.*", category=FutureWarning)
    _init_distributed()
    run_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name
    clean_exit = False
    try:
        # One writer per run directory: a second job with the same experiment.name would prune
        # this one's checkpoints and interleave its metrics.
        with hold_collectively(run_dir, "training run"):
            _Loop(_setup(cfg, run_dir, resume, weights_only)).run()
        clean_exit = True
    finally:
        D.teardown(clean=clean_exit)
    return run_dir


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


@dataclass
class _Setup:
    """Everything the loop needs, built once."""

    cfg: Config
    run_dir: Path
    task: object
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


def _setup(cfg: Config, run_dir: Path, resume: str, weights_only: bool) -> _Setup:
    import deepspeed

    rank, world = D.rank(), D.world_size()
    train_split = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format, cfg.data.max_open_shards)
    val_split = open_store(cfg.data.features_dir, cfg.data.splits.val, cfg.data.store_format, cfg.data.max_open_shards)
    for split in (train_split, val_split):
        check_store_matches(split, cfg)
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
    stage = zero_stage(ds_cfg)
    plan = R.prefer_universal(plan, world)
    R.check_topology(plan, stage, world, run_dir)
    if plan.universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True

    if rank == 0:
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
        R.load_weights_only(model, plan.checkpoint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg.optim)),
    )
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank == 0)
    setup = _Setup(
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
        resumed=plan.checkpoint is not None,
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


class _Loop:
    """Optimizer steps until `train.max_steps`/`epochs` or a stop; logs, evaluates, saves."""

    def __init__(self, s: _Setup) -> None:
        self.s = s
        self.step = s.engine.global_steps
        self.last_saved = self.step if s.resumed else -1
        self.window = {"loss": 0.0, "finite": 0.0, "micro": 0, "wait": 0.0, "skipped": 0, "t0": time.perf_counter()}
        self.peak = peak_flops(s.engine.device, _compute_dtype(s.precision))
        self.flops_per_micro: int | None = None
        self.skip_nonfinite = s.cfg.train.on_nonfinite == "skip"

    def run(self) -> None:
        s = self.s
        stop = StopFlag()
        watch = LauncherWatch(stop)
        checks = StepChecks(s.engine.device)
        s.engine.train()
        try:
            with progress_bar(f"train {s.cfg.experiment.name}", s.total_steps, unit="steps", enabled=D.rank() == 0) as bar:
                bar.advance(self.step)
                while self.step < s.total_steps:
                    if self._epoch(bar, stop, checks):
                        return
            if self.last_saved != self.step:
                self.save()
        finally:
            watch.close()
            stop.restore()

    def _epoch(self, bar, stop: StopFlag, checks: StepChecks) -> bool:
        """Steps until the epoch or the run ends; True when stopped by a signal or the launcher."""
        s, window = self.s, self.window
        batches = iter(s.loader)
        while self.step < s.total_steps:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - t_wait
            if batch is None:
                return False  # end of epoch; the loader now points at the next one
            loss, parts = self._micro_step(to_device(batch, s.engine.device))
            lr_used = float(s.scheduler.get_last_lr()[0])  # the rate this step trains with
            s.engine.step()
            # Device tensors only: no sync until the step's one agreement below.
            finite = checks.note(loss)
            window["loss"] = window["loss"] + torch.where(finite, loss.detach(), torch.zeros_like(loss.detach()))
            window["finite"] = window["finite"] + finite.float()
            window["micro"] += 1
            if s.engine.global_steps == self.step:
                continue  # inside a gradient-accumulation window
            self.step = step = s.engine.global_steps
            bar.advance(1)
            stopping, nonfinite = checks.agree(stop)
            if nonfinite:
                self._nonfinite(step)
            if step % s.cfg.train.log_interval == 0 or step == s.total_steps:
                self._log(step, lr_used, parts, bar)
            improved = (step % s.cfg.train.eval_interval == 0 or step == s.total_steps) and self.evaluate(step)
            # A new best is saved at once, so "best" always names a checkpoint on disk.
            if improved or step % s.cfg.train.save_interval == 0 or step == s.total_steps or stopping:
                self.save()
            if stopping:
                if D.rank() == 0:
                    why = f"by signal after step {step} ({stop.reason})" if stop.reason.startswith("signal") else \
                        f"after step {step} ({stop.reason})"
                    print(f"stopped {why}; checkpoint saved, resume with --resume auto")
                return True
        return False

    def _micro_step(self, batch: dict):
        s = self.s
        if self.peak is not None and self.flops_per_micro is None:
            # The first micro-step runs under FLOP counting (its own forward and backward, no
            # extra work): the FLOPs of later micro-batches of the same shape, for MFU. Only on
            # GPUs with a known peak.
            out: dict = {}
            self.flops_per_micro = count_flops(lambda: _forward_backward(s.task, s.engine, batch, out))
            return out["loss"], out["parts"]
        return _forward_backward(s.task, s.engine, batch)

    def _nonfinite(self, step: int) -> None:
        """A non-finite loss in this step, on some rank. DeepSpeed's ZeRO optimizers skip a step
        whose gradients are not finite (as with fp16 loss scaling), so the weights are intact;
        `skip` counts that and goes on, `stop` ends the run (nothing after the last checkpoint)."""
        s = self.s
        if self.skip_nonfinite and not s.engine.was_step_applied():
            self.window["skipped"] += 1
            return
        applied = " (and this DeepSpeed configuration applied the step)" if self.skip_nonfinite else ""
        raise NonFiniteLoss(
            f"the loss became non-finite (NaN or inf) at step {step}{applied}; nothing after {_last_good(s.run_dir)} "
            "is saved. Resume from there with --resume auto after lowering optim.lr or checking the data"
            + ("" if self.skip_nonfinite else ", or set train.on_nonfinite: skip")
        )

    def _log(self, step: int, lr: float, parts: dict, bar) -> None:
        s = self.s
        record = _log_record(step, s.loader.epoch, self.window, s.cfg.data.micro_batch_size * D.world_size(), lr,
                             {k: v for k, v in parts.items() if k in s.task.logged_parts}, D.world_size(),
                             s.engine.device, self.flops_per_micro, self.peak)
        utilisation = record.get("mfu")
        bar.update(description=f"train {s.cfg.experiment.name} · loss {record['loss']:.4f} · lr {record['lr']:.2e} · "
                               f"{record['samples_per_s']:,.0f} samples/s · data wait {100 * record['data_wait']:.0f}%"
                               + (f" · MFU {100 * utilisation:.1f}%" if utilisation is not None else ""))
        s.log.write(record)
        self.window.update(loss=0.0, finite=0.0, micro=0, wait=0.0, skipped=0, t0=time.perf_counter())

    def save(self) -> None:
        s, step = self.s, self.step
        # Never a checkpoint of non-finite weights (a finite loss can still come with a NaN
        # gradient): they would resume into NaN, or be picked as the best.
        if not params_finite(s.engine.module):
            raise NonFiniteLoss(
                f"the trained parameters became non-finite (NaN or inf) by step {step}; nothing after "
                f"{_last_good(s.run_dir)} is saved. Resume from there with --resume auto after lowering optim.lr"
            )
        meta = {**s.meta_base, "step": step, "epoch": s.loader.epoch, "loader": s.loader.state_dict(), "best": s.best}
        ckpt.save(s.engine, s.run_dir / "checkpoints", step, client_state={"edge_glass": meta}, meta=meta)
        ckpt.prune(s.run_dir / "checkpoints", s.cfg.train.keep_last, {s.best["tag"]} if s.best["tag"] else set())
        self.last_saved = step

    def evaluate(self, step: int) -> bool:
        """Evaluate and track the best; True when this step is the new best (and must be saved)."""
        s = self.s
        metrics = s.task.evaluate(s.engine, s.val_split, D.rank(), D.world_size(),
                                  samples_path=s.run_dir / "samples" / f"step-{step:07d}.jsonl", zero_stage=s.stage)
        value = metrics[s.task.best_metric]
        best = s.best
        # A non-finite value is never the best (NaN compares false both ways).
        improved = math.isfinite(value) and (
            best["value"] is None or (value > best["value"] if s.task.higher_is_better else value < best["value"]))
        if improved:
            best.update(value=value, tag=ckpt.tag_for(step))
        s.log.write({"kind": "eval", "step": step, **metrics, "best": best["value"]})
        return improved


def _log_record(step: int, epoch: int, window: dict, samples_per_micro: int, lr: float, parts: dict, world: int,
                device: torch.device, flops_per_micro: int | None, peak: float | None) -> dict:
    """The window's metrics.jsonl record (the loss averaged over its finite micro-batches, with
    `skipped_nonfinite` steps counted); `mfu` only where the FLOPs and the device's peak are known."""
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    totals = torch.stack([torch.as_tensor(window[k], dtype=torch.float32, device=device).reshape(())
                          for k in ("loss", "finite")])
    if world > 1:
        dist.all_reduce(totals)
    loss = totals[0] / totals[1].clamp(min=1)
    utilisation = mfu(flops_per_micro * window["micro"], elapsed, peak) if flops_per_micro else None
    return {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "loss": float(loss.item()),
        **({"skipped_nonfinite": window["skipped"]} if window["skipped"] else {}),
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


def _last_good(run_dir: Path) -> str:
    newest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return f"the last checkpoint, {newest}" if newest is not None else "the start (no checkpoint was written yet)"


def _compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _make_task(cfg: Config, train_split, init_checkpoint: str | None):
    """The stage's task; a resumed instruct run reuses the align checkpoint it started from."""
    if cfg.train.stage == "align":
        return AlignTask(cfg, train_split)
    from edge_glass.training.instruct_task import InstructTask

    return InstructTask(cfg, train_split, init_checkpoint)


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl as a list of records (for notebooks and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
