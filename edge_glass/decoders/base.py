"""The decoder contract: what the instruct stage asks of any language decoder.

The instruct stage (training/instruct_*.py) turns a batch of samples into prefix embeddings
[N, P, width] — one row per instruction example, P soft tokens from the connectors — and hands
them with the example texts to a `Decoder`. Everything that differs between decoders sits behind
these members: how examples become tensors (a chat template with prefix slots for Qwen, a plain
question and a fixed-length answer for the TRM), the training loss, the evaluation loss and
generation. The training code never asks which decoder it holds.

    batch = decoder.encode_examples(examples, num_prefix_tokens)        # loader thread, CPU tensors
    batch |= decoder.generation_inputs(examples, num_prefix_tokens)     # evaluation only
    loss, parts = decoder.batch_loss(prefix, batch)                     # training step
    loss_sum, count = decoder.eval_loss(prefix, batch)                 # evaluation
    answers, per_example = decoder.answer(prefix, batch, max_new_tokens=..., synced_gpus=...)
    answers, _ = decoder.answer(prefix, batch, max_new_tokens=..., sampling=Sampling(0.7), stream=print)

A new decoder implements this protocol (as an `nn.Module`, so DeepSpeed trains and checkpoints
its parameters) and registers a builder in `decoders/registry.py`; see docs/extending.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from edge_glass.utils.errors import UserError

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt, prefix slots, padding)."""


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding instead of greedy: what `scripts/predict.py --temperature` asks for."""

    temperature: float
    """Softmax temperature (> 0); lower is closer to greedy."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of the draw (the same seed, prompt and weights give the same answer); None: unseeded."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"temperature {self.temperature}: must be > 0 (0 means greedy: pass no Sampling)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p {self.top_p}: must be in (0, 1]")


@contextmanager
def seeded(sampling: Sampling | None, device: torch.device):
    """Torch's global generator seeded for one sampled answer and restored after: Hugging Face
    `generate` draws from the global generator and takes none of its own."""
    if sampling is None or sampling.seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        yield


@runtime_checkable
class Decoder(Protocol):
    """A language decoder that reads soft prefix tokens; implemented by `nn.Module`s."""

    kind: str
    """The name runs, tables and logs show (`qwen`, `trm`, `causal`, a plug-in's name)."""
    width: int
    """Width of the prefix embeddings it reads (the connector's output width)."""
    tokenizer: Any
    """The Hugging Face tokenizer its texts go through."""
    logged_parts: tuple[str, ...]
    """Names in `loss`'s parts dict that the trainer writes to metrics.jsonl."""

    def encode_examples(self, examples: Sequence[dict], num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        """Training inputs of the examples (`{"prompt", "answer", ...}` dicts), as CPU tensors
        with one row per example. Runs in the loader's prefetch thread: no device work here.

        A decoder may lay training batches out otherwise (Qwen's `packing`: several examples per
        row); it then also defines `encode_eval_examples`, the one-row-per-example layout that
        evaluation uses (its batches are cut by example). A `num_tokens` entry (0-d, the real
        tokens, padding excluded) gives the run's tokens/s and MFU over real tokens. A decoder
        may also define `prepare_training()`, which the instruct stage calls once before training
        (Qwen compiles its layers there with `compile: true`)."""
        ...

    def generation_inputs(self, examples: Sequence[dict], num_prefix_tokens: int) -> dict[str, Any]:
        """Extra inputs `answer` needs beyond `encode_examples`'s (may be empty)."""
        ...

    def batch_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the training loss, detached parts to log) of one batch; `prefix` is [N, P, width]."""
        ...

    def eval_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[float, int]:
        """(summed loss, the count it is summed over), so ranks and batches average exactly."""
        ...

    def answer(
        self, prefix: torch.Tensor, batch: dict, *, max_new_tokens: int, synced_gpus: bool = False,
        sampling: Sampling | None = None, stream: Callable[[str], None] | None = None,
    ) -> tuple[list[str], dict[str, list[float]]]:
        """(one answer string per example, per-example extra metrics such as `trm/halt_step`).

        Evaluation asks for greedy answers of a batch. Interactive use (edge_glass/inference.py)
        asks one example and may pass `sampling` and `stream`, a callback that receives the
        answer's text piece by piece as it is generated. Both are optional for a decoder: one
        that cannot sample raises `UserError` when asked; one that does not generate token by
        token calls `stream` once with the whole answer. (A plug-in whose `answer` lacks the two
        keywords still works: the predictor refuses sampling and streams the finished answer.)"""
        ...
