"""The training loop: DeepSpeed engine, exact resume, crash-safe checkpoints, evaluation, logging.

One loop serves every stage; the stage's task (training/task.py) supplies the model, the loss on
a batch and the evaluation. Everything a resumed run needs to continue *exactly* is restored: module, optimizer
and scheduler (DeepSpeed), the data cursor (FeatureLoader state in the checkpoint's metadata),
and each rank's RNG (resume.py). `train` is three parts: `setup_run` (run_setup.py: store, resume
plan, task, engine), `_Loop` (steps, logs, evaluations, checkpoints) and the teardown; run_guards.py says what stops
a run (signals, a vanished launcher, a non-finite loss), and one writer holds the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch

from edge_glass.config import Config
from edge_glass.training import checkpoint as ckpt
from edge_glass.training.align_task import to_device
from edge_glass.training.flops import count_flops, peak_flops
from edge_glass.training.run_guards import LauncherWatch, NonFiniteLoss, StepChecks, StopFlag, params_finite
from edge_glass.training.run_log import train_record
from edge_glass.training.run_setup import RunSetup, init_distributed, setup_run
from edge_glass.utils import distributed as D
from edge_glass.utils.locks import hold_collectively
from edge_glass.utils.progress import progress_bar


KNOWN_HARMLESS = (
    # DeepSpeed's ZeRO path calls a collective torch 2.13 deprecates; nothing a user can act on.
    # torch's message quotes the name in backticks: "`torch.distributed.all_gather_into_tensor` is deprecated."
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
)
"""(message regex, category) of warnings the trainer hides: each one matched against the real message."""


def ignore_known_warnings() -> None:
    for message, category in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)


def train(cfg: Config, resume: str = "auto", weights_only: bool = False) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ignore_known_warnings()
    init_distributed()
    run_dir = Path(cfg.experiment.output_dir) / cfg.experiment.name
    clean_exit = False
    try:
        # One writer per run directory: a second job with the same experiment.name would prune
        # this one's checkpoints and interleave its metrics.
        with hold_collectively(run_dir, "training run"):
            _Loop(setup_run(cfg, run_dir, resume, weights_only)).run()
        clean_exit = True
    finally:
        D.teardown(clean=clean_exit)
    return run_dir


class _Loop:
    """Optimizer steps until `train.max_steps`/`epochs` or a stop; logs, evaluates, saves."""

    def __init__(self, s: RunSetup) -> None:
        self.s = s
        self.step = s.engine.global_steps
        self.last_saved = self.step if s.resumed else -1
        self.window = _fresh_window()
        self.peak = peak_flops(s.engine.device, _compute_dtype(s.precision))
        # FLOPs of the first micro-batch (counted), and per position computed when the stage
        # has token sequences: MFU then counts the real tokens only, padding excluded.
        self.flops_per_micro: int | None = None
        self.flops_per_position: float | None = None
        self.skip_nonfinite = s.cfg.train.on_nonfinite == "skip"

    def run(self) -> None:
        s = self.s
        stop = StopFlag()
        watch = LauncherWatch(stop)
        checks = StepChecks(s.engine.device)
        s.engine.train()
        try:
            with progress_bar(f"train {s.cfg.experiment.name}", s.total_steps, unit="steps", enabled=D.rank() == 0,
                              line_seconds=s.cfg.train.progress_seconds) as bar:
                bar.advance(self.step)
                while self.step < s.total_steps:
                    if self._epoch(bar, stop, checks):
                        return
            if self.last_saved != self.step:
                self.save()
        finally:
            watch.close()
            stop.restore()
            s.log.close()

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
            tokens = s.task.tokens(batch)  # on the host batch: no device sync
            loss, parts = self._micro_step(to_device(batch, s.engine.device), tokens)
            self._count(tokens)
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

    def _micro_step(self, batch: dict, tokens: tuple[int, int] | None):
        s = self.s
        if self.peak is not None and self.flops_per_micro is None:
            # The first micro-step runs under FLOP counting (its own forward and backward, no
            # extra work): the FLOPs of later micro-batches of the same shape, for MFU. Only on
            # GPUs with a known peak.
            out: dict = {}
            self.flops_per_micro = count_flops(lambda: _forward_backward(s.task, s.engine, batch, out))
            if tokens is not None:
                self.flops_per_position = self.flops_per_micro / max(tokens[1], 1)
            return out["loss"], out["parts"]
        return _forward_backward(s.task, s.engine, batch)

    def _count(self, tokens: tuple[int, int] | None) -> None:
        """The micro-batch's real tokens and positions, and the model FLOPs it did usefully."""
        window = self.window
        if tokens is not None:
            window["tokens"] += tokens[0]
            window["positions"] += tokens[1]
        if self.flops_per_position is not None and tokens is not None:
            window["flops"] += self.flops_per_position * tokens[0]
        elif self.flops_per_micro is not None:
            window["flops"] += self.flops_per_micro

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
        record = train_record(step, s.loader.epoch, self.window, s.cfg.data.micro_batch_size * D.world_size(), lr,
                             {k: v for k, v in parts.items() if k in s.task.logged_parts}, D.world_size(),
                             s.engine.device, self.peak)
        utilisation = record.get("mfu")
        bar.update(description=f"train {s.cfg.experiment.name} · loss {record['loss']:.4f} · lr {record['lr']:.2e} · "
                               f"{record['samples_per_s']:,.0f} samples/s · data wait {100 * record['data_wait']:.0f}%"
                               + (f" · MFU {100 * utilisation:.1f}%" if utilisation is not None else ""))
        s.log.write(record)
        self.window.update(_fresh_window())  # in place: _epoch holds the same dict

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


def _fresh_window() -> dict:
    """What a logging window adds up (train_record turns it into the metrics.jsonl record)."""
    return {"loss": 0.0, "finite": 0.0, "micro": 0, "wait": 0.0, "skipped": 0, "tokens": 0, "positions": 0,
            "flops": 0.0, "t0": time.perf_counter()}


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


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl as a list of records (for notebooks and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
