"""Raw shards to encoder-ready batches, decoded and preprocessed in worker processes.

Decoding a JPEG and resizing it, or computing a log-mel spectrogram, costs ~2 ms of one core per
sample: one thread does ~500 samples/s, half of what one GPU encodes. Extraction therefore
runs this half in `torch.utils.data.DataLoader` worker processes, each making whole batches:
worker w of W decodes and preprocesses batches w, w + W, ... of the rank's shards (it reads the
tar members of the others without decoding them, which costs little), and the DataLoader hands
them back in order. Batches never span two shards, and their composition depends only on the
shards and the batch size, so the encoders see exactly the batches a single process would
make: the store is byte-identical whatever the number of workers (tests/test_extract.py).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from edge_glass.data.raw_shards import decode_sample, iter_shard_raw
from edge_glass.encoders.base import FrozenEncoder
from edge_glass.features.sample_checks import raw_problem
from edge_glass.modalities import raw_field
from edge_glass.utils.errors import UserError
from edge_glass.utils.prefetch import prefetch



def default_num_workers() -> int:
    """The cores this rank's share of the machine has, minus one for the rank itself, 0 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, cores // max(ranks, 1) - 1))


def encoder_inputs(modality: str, samples: list[dict], path: Path) -> list[Any]:
    """What `encoders[modality].prepare` takes, from decoded raw samples."""
    field = raw_field(modality)
    missing = [s["key"] for s in samples if s.get(field) is None]
    if missing:
        raise UserError(f"{path}: sample {missing[0]!r} has no {field}, but encoders.{modality} is configured")
    if modality == "audio":
        return [(s["audio"], s["sample_rate"]) for s in samples]
    return [s[field] for s in samples]


def prepare_batch(samples: list[dict], encoders: dict[str, FrozenEncoder], path: Path, shard: int) -> dict:
    return {
        "shard": shard,
        "keys": [s["key"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "meta": [json.dumps(s["json"], sort_keys=True) for s in samples],
        "inputs": {m: e.prepare(encoder_inputs(m, samples, path)) for m, e in encoders.items()},
    }


class _ShardBatches(IterableDataset):
    """Batches of `shards` (index, path) in order; in a worker, only that worker's share."""

    def __init__(self, shards: list[tuple[int, Path]], batch_size: int, encoders: dict[str, FrozenEncoder],
                 on_bad_sample: str) -> None:
        self.shards, self.batch_size, self.encoders = shards, batch_size, encoders
        self.on_bad_sample = on_bad_sample

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self._batches()
        except UserError as e:
            # Crossing the process boundary, an exception becomes a multi-line traceback; a
            # user's data problem must stay one line, so it travels as a value.
            yield {"error": str(e)}

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        number = 0  # batch number over all shards: which worker makes it
        for index, path in self.shards:
            raw: list[dict] = []
            for sample in _members(path):
                raw.append(sample)
                if len(raw) == self.batch_size:
                    if number % workers == worker:
                        yield self._prepare(raw, path, index)
                    number, raw = number + 1, []
            if raw:
                if number % workers == worker:
                    yield self._prepare(raw, path, index)
                number += 1

    def _prepare(self, raw: list[dict], path: Path, index: int) -> dict:
        """One batch, its bad samples refused or left out (and counted: a batch left with no
        sample still travels, with its counts)."""
        samples, skipped = [], Counter()
        for r in raw:
            sample = decode_sample(r, str(path))
            problem = raw_problem(sample, self.encoders)
            if problem is None:
                samples.append(sample)
            elif self.on_bad_sample == "skip":
                skipped[problem[0]] += 1
            else:
                raise UserError(f"{path}: sample {sample['key']!r}: {problem[1]}; fix the raw data, or set "
                                "encoders.on_bad_sample: skip to leave such samples out (they are counted)")
        item = prepare_batch(samples, self.encoders, path, index) if samples else {
            "shard": index, "keys": [], "captions": [], "meta": [], "inputs": {}}
        item["skipped"] = dict(skipped)
        return item


def _members(path: Path) -> Iterator[dict]:
    try:
        yield from iter_shard_raw(path)
    except Exception as e:  # a truncated or corrupt tar is the user's data problem
        raise UserError(f"{path}: cannot read the raw shard: {e}") from None


def _worker_init(_: int) -> None:
    # The tokenizers' own thread pool does not survive a fork; one worker is one core anyway.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def prepared_batches(shards: list[tuple[int, Path]], batch_size: int, encoders: dict[str, FrozenEncoder],
                     num_workers: int, pin_memory: bool = False, on_bad_sample: str = "error") -> Iterator[dict]:
    """Every batch of `shards`, in order, with `shard`, `keys`, `captions`, `meta` (JSON text),
    `inputs` (per modality, what its encoder's `encode` takes) and `skipped` (reason -> samples
    left out, with `on_bad_sample` "skip"; sample_checks.py). With `num_workers` 0 a thread
    prepares the next batches while the caller encodes."""
    dataset = _ShardBatches(shards, batch_size, encoders, on_bad_sample)
    if num_workers <= 0:
        items: Iterator[dict] = prefetch(iter(dataset), depth=2)
    else:
        items = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                prefetch_factor=2, worker_init_fn=_worker_init, persistent_workers=False))
    for item in items:
        if "error" in item:
            raise UserError(item["error"])
        if pin_memory and num_workers <= 0:
            item["inputs"] = {m: {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
                              for m, x in item["inputs"].items()}
        yield item
