"""The stage contract and the one stage registry: what `train.stage` means to every tool.

A stage (`align`, `instruct`) is a `Task` for the trainer — the model, the loss on a batch, the
evaluation during training — plus what the tools do with one of its finished runs: load the
trained model, make evaluation batches, score them, write the report. The trainer,
`scripts/evaluate.py`, sweeps and the notebook helpers all look a stage up here, so none of
them asks which stage it holds.

    task = make_task(cfg, train_split)                  # the trainer
    cfg, model, checkpoint = load_run("runs/quickstart")  # evaluate.py, sweeps, notebooks
    stage = stage_of(cfg)
    metrics, logged = stage.evaluate(cfg, model, stage.eval_batches(cfg, model, split))

Entries import their modules on first use, so an align run never imports the decoders.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from edge_glass.config import Config
from edge_glass.features.store import FeatureSplit
from edge_glass.training.run_loading import run_config


class Task(Protocol):
    """One training stage as the trainer drives it (training/trainer.py)."""

    model: torch.nn.Module
    """What DeepSpeed wraps; its trainable parameters are what trains."""
    modalities: list[str]
    """The feature modalities its batches need from the store."""
    init_checkpoint: str | None
    """A checkpoint it started from (recorded in every checkpoint, so a resume reloads it)."""
    loader_options: dict
    """Extra `FeatureLoader` arguments (e.g. a transform that tokenises in the loader thread)."""
    logged_parts: tuple[str, ...]
    """Names in `loss`'s parts dict that go to metrics.jsonl."""
    best_metric: str
    """The evaluation metric that picks the best checkpoint."""
    higher_is_better: bool
    """Whether `best_metric` improves upwards."""

    def describe(self) -> str:
        """One line for the start of a run."""
        ...

    def loss(self, engine, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts to log) of one micro-batch, through the DeepSpeed engine."""
        ...

    def tokens(self, batch: dict) -> tuple[int, int] | None:
        """(real tokens, positions computed) of a host-side micro-batch, for tokens/s and an MFU
        over the real tokens only (padding excluded); None for a stage without token sequences."""
        ...

    def evaluate(self, engine, split: FeatureSplit, rank: int, world_size: int, samples_path: Path | None = None,
                 zero_stage: int = 0) -> dict[str, float]:
        """`val/...` metrics on the split, reduced over ranks; includes `best_metric`."""
        ...


def _lazy(ref: str) -> Callable[..., Any]:
    """A function that imports "module:attribute" on its first call and calls it."""

    def call(*args: Any, **kwargs: Any) -> Any:
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__qualname__ = call.__name__ = ref
    return call


@dataclass(frozen=True)
class Stage:
    """What a stage is to the tools; every member is a function."""

    task: Callable[..., Task]
    """Its `Task` class: `(cfg, train_split, init_checkpoint)`."""
    load_run: Callable[..., tuple]
    """`(run_dir, which)` -> (config, model in eval mode with the trained weights, checkpoint)."""
    eval_batches: Callable[..., Any]
    """`(cfg, model, split)` -> the split's evaluation batches in store order, on the model's device."""
    evaluate: Callable[..., tuple[dict, list]]
    """`(cfg, model, batches, *, num_samples_to_log)` -> (metrics, logged examples)."""
    report: Callable[..., list[Path]]
    """`(cfg, metrics, logged, summary, stem)` -> prints the table, returns the files written."""


STAGES: dict[str, Stage] = {
    "align": Stage(
        task=_lazy("edge_glass.training.align_task:AlignTask"),
        load_run=_lazy("edge_glass.training.run_loading:load_alignment_model"),
        eval_batches=_lazy("edge_glass.training.align_task:eval_batches"),
        evaluate=_lazy("edge_glass.training.align_task:evaluate_batches"),
        report=_lazy("edge_glass.training.align_task:report"),
    ),
    "instruct": Stage(
        task=_lazy("edge_glass.training.instruct_task:InstructTask"),
        load_run=_lazy("edge_glass.training.instruct_task:load_instruct_model"),
        eval_batches=_lazy("edge_glass.training.instruct_task:eval_batches"),
        evaluate=_lazy("edge_glass.training.instruct_task:evaluate_batches"),
        report=_lazy("edge_glass.training.instruct_task:report"),
    ),
}


def stage_of(cfg: Config) -> Stage:
    return STAGES[cfg.train.stage]


def make_task(cfg: Config, train_split: FeatureSplit, init_checkpoint: str | None = None) -> Task:
    """The stage's task; a resumed run passes the checkpoint it started from."""
    return stage_of(cfg).task(cfg, train_split, init_checkpoint)


def load_run(run_dir: str | Path, which: str = "best") -> tuple[Config, torch.nn.Module, Path]:
    """(config, model in eval mode with the trained weights, checkpoint used) of any run."""
    return stage_of(run_config(run_dir)).load_run(run_dir, which)
