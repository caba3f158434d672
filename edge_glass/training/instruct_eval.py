"""Evaluate an instruct-stage model: LM loss, greedy generation, SQuAD exact match and token F1.

Metrics come overall, per example kind (`caption`, `qa`) and per QA attribute
(`qa/colour/exact_match`, ...), summed over every rank's share of the split. The TRM also reports
the mean supervision step at which its halting head stopped (`trm/halt_step`).

`lm_loss` is the decoder's `eval_loss` on the split (decoders/base.py): for Qwen the token-mean
cross-entropy over answer + end-of-turn tokens (teacher forced), for the TRM the deep-supervision
loss (the mean over its supervision steps), for the causal baseline the answer tokens' mean
cross-entropy. Whatever per-example figures a decoder's `answer` returns (the TRM's
`trm/halt_step`) are averaged the same way.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from edge_glass.decoders.generation import exact_match, token_f1
from edge_glass.training.instruct_model import InstructModel
from edge_glass.utils import distributed as D


@torch.no_grad()
def instruct_metrics(
    model: InstructModel,
    batches,
    *,
    max_new_tokens: int,
    max_samples: int | None = None,
    num_samples_to_log: int = 0,
    synced_gpus: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, logged generations) over the batches of this rank, reduced over all ranks.

    `max_samples` bounds the samples evaluated over all ranks (each rank takes its share).
    """
    was_training = model.training
    model.eval()
    world = D.world_size()
    limit = None if max_samples is None else -(-max_samples // world)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [sum, count]
    logged: list[dict] = []
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            continue  # every rank still drains its loader, so no rank waits on another
        if limit is not None and seen + len(batch["keys"]) > limit:
            batch = _first_samples(batch, limit - seen)
        seen += len(batch["keys"])
        if len(batch["example_sample"]) == 0:
            continue  # the cut kept only samples without an example of the configured kinds
        prefix = model.prefix(batch)[batch["example_sample"]]
        loss_sum, count = model.decoder.eval_loss(prefix, batch)
        preds, per_example = model.decoder.answer(prefix, batch, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus)
        _add(sums, "lm_loss", loss_sum, count)
        for i, (pred, gold) in enumerate(zip(preds, batch["answers"])):
            em, f1 = exact_match(pred, gold), token_f1(pred, gold)
            kind, attribute = batch["kinds"][i], batch["attributes"][i]
            for group in ("", f"{kind}/") + ((f"{kind}/{attribute}/",) if attribute else ()):
                _add(sums, f"{group}exact_match", em, 1)
                _add(sums, f"{group}token_f1", f1, 1)
            for name, values in per_example.items():
                _add(sums, name, values[i], 1)
            if len(logged) < num_samples_to_log:
                logged.append({
                    "key": batch["example_keys"][i], "kind": kind, "attribute": attribute,
                    "question": batch["questions"][i], "answer": gold, "prediction": pred, "exact_match": em, "token_f1": f1,
                })
    model.train(was_training)
    totals = _reduce(dict(sums))
    metrics = {k: s / c for k, (s, c) in sorted(totals.items()) if c > 0}
    metrics["num_examples"] = totals.get("exact_match", (0.0, 0.0))[1]
    return metrics, logged


def _add(sums: dict, name: str, value: float, count: float) -> None:
    sums[name][0] += value
    sums[name][1] += count


def _first_samples(batch: dict, n: int) -> dict:
    """The batch cut to its first n samples and their examples."""
    keep = batch["example_sample"] < n
    rows = keep.nonzero().squeeze(1)
    out = {}
    for k, v in batch.items():
        if k in ("keys", "captions", "meta"):
            out[k] = v[:n]
        elif isinstance(v, dict):
            out[k] = {kk: vv[:n] for kk, vv in v.items()}
        elif isinstance(v, torch.Tensor) and v.dim() == 0:  # a count of the whole batch (num_tokens)
            out[k] = v
        elif isinstance(v, torch.Tensor):
            out[k] = v[rows]
        elif isinstance(v, list):
            out[k] = [v[int(i)] for i in rows]
        else:
            out[k] = v
    return out


def _reduce(sums: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Element-wise sum of every rank's {name: [sum, count]}."""
    if D.world_size() == 1:
        return {k: (v[0], v[1]) for k, v in sums.items()}
    gathered: list = [None] * D.world_size()
    dist.all_gather_object(gathered, sums)
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for part in gathered:
        for k, (s, c) in part.items():
            total[k][0] += s
            total[k][1] += c
    return {k: (v[0], v[1]) for k, v in total.items()}
