"""Writing feature shards off the extraction's critical path.

The extracting thread encodes batch k+1 while this writer's thread waits for batch k's copy to
the host, collects the shard's batches, and at the end of each shard writes its files (under
temporary names, then renamed), hashes them and writes the shard's record (its presence marks
the shard complete; see extract.py). The queue between them is short, so a slow disk slows the
encoders down instead of filling memory.
"""

from __future__ import annotations

import errno
import json
import queue
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.features.hdf5_shard import write_hdf5_shard
from edge_glass.features.manifest import FORMAT_SUFFIX, FORMAT_VERSION, read_json, shard_stem
from edge_glass.features.sample_checks import NONFINITE_FEATURES
from edge_glass.features.stats import RunningMoments
from edge_glass.features.wds_shard import write_wds_shard
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path, sha256_file, write_text_atomic


@dataclass
class StoredBatch:
    """One encoded batch as it will be stored: host tensors (possibly still being copied from
    the device until `ready` completes) and the per-dimension sums of its stored values."""

    keys: list[str]
    captions: list[str]
    meta: list[str]
    tokens: dict[str, torch.Tensor]
    """[rows, W] flat token rows per modality, stored dtype."""
    lengths: dict[str, np.ndarray]
    scales: dict[str, torch.Tensor | None]
    pooled: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    """Per field (`vision.tokens`, ...): [3, D] float64 rows: count, sum, sum of squares."""
    dims: dict[str, int]
    """Per modality: the token width D (int4 stores D/2 bytes a row)."""
    bad: torch.Tensor | None = None
    """[B] bool: samples whose encoder output is not finite in some modality."""
    ready: Any = None
    """A CUDA event recorded after the copies to the host; None when nothing is in flight."""


@dataclass
class _Shard:
    index: int
    raw_path: Path
    started: float = field(default_factory=time.perf_counter)
    batches: list[StoredBatch] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


class ShardWriter:
    """A thread that assembles and writes shards of split directory `out`."""

    def __init__(self, out: Path, formats: list[str], settings: dict, on_bad_sample: str = "error", depth: int = 4) -> None:
        self.out, self.formats, self.settings = out, formats, settings
        self.on_bad_sample = on_bad_sample
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._current: _Shard | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def begin(self, index: int, raw_path: Path) -> None:
        self._put(("begin", index, raw_path))

    def add(self, batch: StoredBatch | None, skipped: dict | None = None) -> None:
        """A batch of the current shard (None: all its samples were left out) and the samples
        left out of it, by reason."""
        self._put(("add", batch, skipped or {}))

    def end(self) -> None:
        """The current shard is complete: write it."""
        self._put(("end",))

    def close(self) -> None:
        """Wait until everything queued is written; re-raise the writer's error, if any."""
        self._put(("stop",))
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop without writing what is queued (the extraction failed)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(("stop",))
        self._thread.join(timeout=30)

    def _put(self, item: tuple) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item[0] == "stop":
                return
            if self._error is not None:
                continue  # drain until stopped
            try:
                if item[0] == "begin":
                    self._current = _Shard(item[1], item[2])
                elif item[0] == "add":
                    if item[1] is not None:
                        self._current.batches.append(item[1])
                    self._current.skipped.update(item[2])
                else:
                    self._write(self._current)
                    self._current = None
            except BaseException as e:  # re-raised in the extracting thread
                self._error = e

    def _write(self, shard: _Shard) -> None:
        for b in shard.batches:
            if b.ready is not None:
                b.ready.synchronize()
        batches = [self._finite(b, shard) for b in shard.batches]
        batches = [b for b in batches if b.keys]
        if not batches:
            raise UserError(f"{shard.raw_path}: every sample of this raw shard was left out "
                            f"({', '.join(f'{k}: {v}' for k, v in sorted(shard.skipped.items()))}); check the raw data")
        block, moments, dims = assemble(batches)
        try:
            write_shard_files(self.out, shard.index, shard.raw_path, block, moments, dims, self.formats, self.settings,
                              time.perf_counter() - shard.started, dict(shard.skipped))
        except OSError as e:
            raise disk_error(self.out, e, f"writing feature shard {shard.index}") from None

    def _finite(self, b: StoredBatch, shard: _Shard) -> StoredBatch:
        """The batch without its samples of non-finite outputs (or the error naming the first)."""
        bad = b.bad.numpy().astype(bool) if b.bad is not None else np.zeros(len(b.keys), bool)
        if not bad.any():
            return b
        first = b.keys[int(np.flatnonzero(bad)[0])]
        if self.on_bad_sample != "skip":
            raise UserError(f"{shard.raw_path}: sample {first!r}: the encoders' output holds NaN or inf; fix the raw "
                            "data, or set encoders.on_bad_sample: skip to leave such samples out (they are counted)")
        shard.skipped[NONFINITE_FEATURES] += int(bad.sum())
        return drop_samples(b, ~bad)


def drop_samples(b: StoredBatch, keep: np.ndarray) -> StoredBatch:
    """The batch with only the samples where `keep` is true (its sums already exclude the rest)."""
    pick = np.flatnonzero(keep)
    tokens, scales, lengths, pooled = {}, {}, {}, {}
    for m in b.tokens:
        row_keep = np.repeat(keep, b.lengths[m])
        tokens[m] = b.tokens[m][torch.from_numpy(row_keep)]
        scales[m] = None if b.scales[m] is None else b.scales[m][torch.from_numpy(row_keep)]
        lengths[m] = b.lengths[m][pick]
        pooled[m] = b.pooled[m][torch.from_numpy(pick)]
    return StoredBatch([b.keys[i] for i in pick], [b.captions[i] for i in pick], [b.meta[i] for i in pick],
                       tokens, lengths, scales, pooled, b.sums, b.dims)


def disk_error(directory: Path, error: OSError, doing: str) -> BaseException:
    """An OSError while writing as one line: the directory and its free space when it is full."""
    # h5py reports a full disk as an OSError without an errno, the reason only in its text.
    if error.errno != errno.ENOSPC and "No space left" not in str(error):
        return error
    free = shutil.disk_usage(directory).free
    return UserError(f"{doing} in {directory} failed: no space left on the device ({free / 2**20:,.0f} MiB free); "
                     "complete shards are kept: free space and re-run extraction to finish")


def assemble(batches: list[StoredBatch]) -> tuple[FeatureBlock, dict[str, RunningMoments], dict[str, int]]:
    """One shard's batches as one block, and its per-field moments."""
    keys = [k for b in batches for k in b.keys]
    captions = [c for b in batches for c in b.captions]
    meta = [j for b in batches for j in b.meta]
    modalities = {}
    for m in batches[0].tokens:
        lengths = np.concatenate([b.lengths[m] for b in batches])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        scales = None
        if batches[0].scales[m] is not None:
            scales = np.concatenate([b.scales[m].numpy() for b in batches])
        modalities[m] = ModalityArrays(np.concatenate([b.tokens[m].numpy() for b in batches]), offsets,
                                       np.concatenate([b.pooled[m].numpy() for b in batches]), scales)
    moments: dict[str, RunningMoments] = {}
    for b in batches:
        for f, sums in b.sums.items():
            rows = sums.numpy()
            moments.setdefault(f, RunningMoments(rows.shape[1])).add(int(rows[0, 0]), rows[1], rows[2])
    return FeatureBlock(keys, captions, meta, modalities), moments, batches[0].dims


def write_shard_files(out: Path, index: int, raw_path: Path, block: FeatureBlock, moments: dict[str, RunningMoments],
                      dims: dict[str, int], formats: list[str], settings: dict, seconds: float,
                      skipped: dict | None = None) -> None:
    """Shard `index`'s files in `formats` and, last, its record (which marks it complete)."""
    stem = shard_stem(index)
    files = {}
    for fmt in formats:
        final = out / f"{stem}{FORMAT_SUFFIX[fmt]}"
        with atomic_path(final) as tmp:
            if fmt == "hdf5":
                attrs = {"format_version": FORMAT_VERSION, "fingerprint": settings["fingerprint"],
                         "token_dtype": settings["token_dtype"]}
                write_hdf5_shard(tmp, block, attrs)
            else:
                write_wds_shard(tmp, block)
        files[fmt] = {"file": final.name, "sha256": sha256_file(final), "bytes": final.stat().st_size}
    old_record = out / f"{stem}.json"
    if old_record.is_file():
        prev = read_json(old_record)
        if prev.get("fingerprint") == settings["fingerprint"]:
            for fmt, entry in prev.get("files", {}).items():
                if fmt not in files and (out / entry["file"]).is_file():
                    files[fmt] = entry
    files = dict(sorted(files.items()))
    fields = {}
    for m, a in block.modalities.items():
        fields[f"{m}.tokens"] = {"dim": dims[m], "max_length": int(a.lengths.max())}
        fields[f"{m}.pooled"] = {"dim": int(a.pooled.shape[1])}
    record = {
        "name": stem,
        "raw_shard": raw_path.name,
        "num_samples": len(block),
        "fingerprint": settings["fingerprint"],
        "files": files,
        "fields": fields,
        "moments": {k: v.to_json() for k, v in moments.items()},
        "skipped": dict(sorted((skipped or {}).items())),
        "seconds": round(seconds, 3),
    }
    write_text_atomic(out / f"{stem}.json", json.dumps(record, sort_keys=True))
