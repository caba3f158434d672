"""Reading a feature store: `open_store(path, split)` for notebooks, scripts and the loader.

    split = open_store("data/features/quickstart", "val")
    split[0]["vision_tokens"].shape, len(split), split.manifest["encoders"]["vision"]["model"]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from edge_glass.config import Config
from edge_glass.features.block import FeatureBlock, concat_blocks
from edge_glass.features.hdf5_shard import Hdf5Shard
from edge_glass.features.manifest import EXTRACT_HINT, load_manifest, split_dir
from edge_glass.features.wds_shard import WdsShard, iter_wds_samples
from edge_glass.utils.errors import UserError

_SHARD_CLASS = {"hdf5": Hdf5Shard, "webdataset": WdsShard}


class FeatureSplit:
    """One split of a store: its manifest, its length, random access and iteration."""

    def __init__(self, store: str | Path, split: str, backend: str | None = None) -> None:
        self.path = split_dir(store, split)
        self.split = split
        self.manifest = load_manifest(store, split)
        formats = self.manifest["formats"]
        if backend is None:
            backend = "hdf5" if "hdf5" in formats else formats[0]
        if backend not in formats:
            raise UserError(
                f"{self.path} has no {backend} shards (it holds {', '.join(formats)}); "
                f"add them with: {EXTRACT_HINT} --format {backend}"
            )
        self.backend = backend
        shards = self.manifest["shards"]
        self.shards = [_SHARD_CLASS[backend](self.path / s["files"][backend]["file"]) for s in shards]
        self.shard_sizes = np.array([s["num_samples"] for s in shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def modalities(self) -> list[str]:
        return sorted({f.split(".")[0] for f in self.manifest["fields"]})

    def field_dim(self, field: str) -> int:
        """Width of a field such as `vision.tokens` or `text.pooled`."""
        return int(self.manifest["fields"][field]["dim"])

    def stats(self, field: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and std of `field` over this split."""
        s = self.manifest["stats"][field]
        return np.asarray(s["mean"], dtype=np.float32), np.asarray(s["std"], dtype=np.float32)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row within shard) of a global sample index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside {self.path} ({len(self)} samples)")
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return shard, index - int(self.shard_starts[shard])

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop) of the split, across shard boundaries."""
        blocks = []
        pos = start
        while pos < stop:
            shard, row = self.locate(pos)
            take = min(stop - pos, int(self.shard_sizes[shard]) - row)
            blocks.append(self.shards[shard].read(row, row + take, modalities, with_meta))
            pos += take
        return concat_blocks(blocks) if blocks else FeatureBlock([], [], [], {})

    def __getitem__(self, index: int) -> dict:
        return _sample(self.read(index, index + 1), 0)

    def __iter__(self) -> Iterator[dict]:
        """Every sample in store order, as a dict of arrays (`vision_tokens`, `text_pooled`, ...)."""
        if self.backend == "webdataset":
            for shard, size in zip(self.shards, self.shard_sizes):
                n = 0
                for sample in iter_wds_samples(shard.path):
                    n += 1
                    yield sample
                if n != size:
                    raise UserError(f"{shard.path}: holds {n} samples, manifest says {size}; re-run extraction with --overwrite")
            return
        step = 256
        for start in range(0, len(self), step):
            block = self.read(start, min(start + step, len(self)))
            for i in range(len(block)):
                yield _sample(block, i)


def _sample(block: FeatureBlock, i: int) -> dict:
    out = {"key": block.keys[i], "caption": block.captions[i], "meta": json.loads(block.meta[i])}
    for m, a in block.modalities.items():
        out[f"{m}_tokens"] = a.tokens[a.offsets[i] : a.offsets[i + 1]]
        out[f"{m}_pooled"] = a.pooled[i]
    return out


def open_store(path: str | Path, split: str = "train", backend: str | None = None) -> FeatureSplit:
    """Open one split of a feature store (HDF5 when present, else WebDataset)."""
    return FeatureSplit(path, split, backend)


def check_store_matches(split: FeatureSplit, cfg: Config) -> None:
    """Refuse a store whose encoders or fields differ from what the config asks for."""
    enc = split.manifest["encoders"]
    for m in cfg.model.adapters.enabled():
        want = getattr(cfg.encoders, m)
        if m not in enc:
            raise UserError(f"{split.path} has no {m} features, but model.adapters.{m} needs them; re-extract with: {EXTRACT_HINT}")
        have = enc[m]
        for key in ("model", "revision", "layer"):
            if key in have and have[key] != getattr(want, key, have[key]):
                raise UserError(
                    f"{split.path}: encoders.{m}.{key} is {getattr(want, key)!r} in the config but {have[key]!r} in the store "
                    f"(store fingerprint {split.manifest['fingerprint']}); re-extract with: {EXTRACT_HINT} --overwrite"
                )
