"""Reading a feature store: `open_store(path, split)` for notebooks, scripts and the loader.

    split = open_store("data/features/quickstart", "val")
    split[0]["vision_tokens"].shape, len(split), split.manifest["encoders"]["vision"]["model"]

`read` and iteration give float tokens whatever the store holds (an int8/int4 store is
dequantised on the way out); the training loader reads the stored codes instead and leaves the
dequantisation to the model on its device (quantize.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from edge_glass.config import Config, plain_name
from edge_glass.features.block import BlockIndex, FeatureBlock, ModalityArrays, concat_blocks
from edge_glass.features.hdf5_shard import Hdf5Shard, header_files
from edge_glass.features.manifest import (
    EXTRACT_HINT,
    MANIFEST,
    differences,
    load_manifest,
    manifest_encoder_fingerprint,
    pooled_dtype,
    split_dir,
    token_dtype,
)
from edge_glass.features.open_files import ShardCache, reserve_files
from edge_glass.features.quantize import TokenLayout, dequantize
from edge_glass.features.wds_shard import WdsShard, iter_wds_samples
from edge_glass.utils.errors import UserError

_SHARD_CLASS = {"hdf5": Hdf5Shard, "webdataset": WdsShard}
DEFAULT_MAX_OPEN_SHARDS = 64


class FeatureSplit:
    """One split of a store: its manifest, its length, random access and iteration.

    At most `max_open_shards` of its shard files are open at once, however many it has."""

    def __init__(self, store: str | Path, split: str, backend: str | None = None,
                 max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS) -> None:
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
        self.token_dtype = token_dtype(self.manifest)
        self.pooled_dtype = pooled_dtype(self.manifest)
        self.encoder_fingerprint = manifest_encoder_fingerprint(self.manifest)
        # A tar's index holds no descriptor; only HDF5 shards count against the open-file limit.
        # Of an HDF5 split's `max_open_shards` files, a few are shards opened through HDF5 (for
        # their strings; ~0.6 MB of library state each) and the rest plain descriptors (for the
        # token rows; a few hundred bytes each): hdf5_shard.py.
        self._files = None
        self.headers: ShardCache | None = None
        if backend == "hdf5":
            headers = header_files(max_open_shards)
            descriptors = max(1, max_open_shards - headers)
            self._files = reserve_files(headers + descriptors)
            self.headers = ShardCache(headers, lambda shard: shard.open_header())
            self.cache = ShardCache(descriptors, lambda shard: shard.open())
        else:
            self.cache = ShardCache(max_open_shards, lambda shard: shard.open())
        # The per-shard entries are kept as arrays, not as the manifest's dicts: at 10,000 shards
        # those are ~15 MB of Python objects in every rank, memory that grows with the store.
        # (`manifest.json` itself has them all; `verify` and the converter read it.)
        shards = self.manifest.pop("shards")
        self.shard_files = [s["files"][backend]["file"] for s in shards]
        unsafe = next((f for f in self.shard_files if not plain_name(f)), None)
        if unsafe is not None:
            # A manifest is data a user may be handed: its file entries must stay in the split.
            raise UserError(f"{self.path / MANIFEST}: shard file {unsafe!r} is not a plain file name; refusing the manifest")
        self.shard_bytes = np.array([s["files"][backend].get("bytes", -1) for s in shards], dtype=np.int64)
        self.shard_sizes = np.array([s["num_samples"] for s in shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        del shards
        self.shards = _Shards(self, _SHARD_CLASS[backend])

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

    def token_layout(self, modality: str) -> TokenLayout:
        return TokenLayout(self.token_dtype, self.field_dim(f"{modality}.tokens"))

    def dequant_params(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """The per-dimension (center, spread) a quantised split's tokens were z-scored with."""
        try:
            q = self.manifest["quantization"][modality]
        except KeyError:
            raise UserError(
                f"{self.path}: the manifest says its tokens are {self.token_dtype} but does not say how to dequantise "
                f"{modality} tokens (no quantization.{modality}); re-convert or re-extract the store"
            ) from None
        return np.asarray(q["center"], dtype=np.float32), np.asarray(q["spread"], dtype=np.float32)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, row within shard) of a global sample index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside {self.path} ({len(self)} samples)")
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return shard, index - int(self.shard_starts[shard])

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True,
             dequantize: bool = True) -> FeatureBlock:
        """Samples [start, stop) of the split, across shard boundaries; float tokens unless
        `dequantize` is False (then int8/int4 codes and their `scales`, as stored)."""
        blocks = []
        pos = start
        while pos < stop:
            shard, row = self.locate(pos)
            take = min(stop - pos, int(self.shard_sizes[shard]) - row)
            blocks.append(self.shards[shard].read(row, row + take, modalities, with_meta))
            pos += take
        block = concat_blocks(blocks) if blocks else FeatureBlock([], [], [], {})
        if dequantize and self.quantized:
            block = self._dequantized(block)
        return block

    @property
    def quantized(self) -> bool:
        return self.token_dtype in ("int8", "int4")

    def _dequantized(self, block: FeatureBlock) -> FeatureBlock:
        out = {}
        for m, a in block.modalities.items():
            center, spread = self.dequant_params(m)
            tokens = dequantize(torch.from_numpy(np.ascontiguousarray(a.tokens)), torch.from_numpy(np.ascontiguousarray(a.scales)),
                                torch.from_numpy(center), torch.from_numpy(spread), self.token_dtype).numpy()
            out[m] = ModalityArrays(tokens, a.offsets, a.pooled)
        return FeatureBlock(block.keys, block.captions, block.meta, out)

    def read_index(self, start: int, stop: int, modalities: list[str], with_meta: bool) -> BlockIndex:
        """Samples [start, stop) of one shard without their token rows (the loader's read)."""
        shard, row = self.locate(start)
        if stop - start + row > self.shard_sizes[shard]:
            raise ValueError(f"samples {start}..{stop - 1} cross a shard boundary")
        return self.shards[shard].read_index(row, row + stop - start, modalities, with_meta)

    def __getitem__(self, index: int) -> dict:
        return _sample(self.read(index, index + 1), 0)

    def __iter__(self) -> Iterator[dict]:
        """Every sample in store order, as a dict of arrays (`vision_tokens`, `text_pooled`, ...)."""
        if self.backend == "webdataset" and not self.quantized:
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

    def close(self) -> None:
        """Close every open shard file (they reopen on the next read)."""
        self.cache.close()
        if self.headers is not None:
            self.headers.close()


class _Shards(Sequence):
    """The split's shard readers, made on demand from its arrays (a reader holds no resources:
    the split's cache holds the open ones, keyed by path)."""

    def __init__(self, split: FeatureSplit, cls: type) -> None:
        self._split, self._cls = split, cls

    def __len__(self) -> int:
        return len(self._split.shard_files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        s = self._split
        expected = int(s.shard_bytes[i])
        extra = {"headers": s.headers} if s.headers is not None else {}
        return self._cls(s.path / s.shard_files[i], s.cache, expected if expected >= 0 else None, int(s.shard_sizes[i]),
                         **extra)


def _sample(block: FeatureBlock, i: int) -> dict:
    out = {"key": block.keys[i], "caption": block.captions[i], "meta": json.loads(block.meta[i])}
    for m, a in block.modalities.items():
        out[f"{m}_tokens"] = a.tokens[a.offsets[i] : a.offsets[i + 1]]
        out[f"{m}_pooled"] = a.pooled[i]
    return out


def open_store(path: str | Path, split: str = "train", backend: str | None = None,
               max_open_shards: int = DEFAULT_MAX_OPEN_SHARDS) -> FeatureSplit:
    """Open one split of a feature store (HDF5 when present, else WebDataset)."""
    return FeatureSplit(path, split, backend, max_open_shards)


def check_same_encoders(split: FeatureSplit, reference: FeatureSplit) -> None:
    """Refuse a split whose features come from other encoders than `reference`'s (the store a
    model was trained on); how either stores them may differ."""
    if split.encoder_fingerprint != reference.encoder_fingerprint:
        changed = ", ".join(f"encoders.{d}" for d in differences(reference.manifest["encoders"], split.manifest["encoders"]))
        raise UserError(
            f"{split.path} holds features of other encoders than {reference.path} (encoder fingerprint "
            f"{split.encoder_fingerprint}, the run's {reference.encoder_fingerprint}; differs in {changed or 'the encoders'})"
        )


def check_store_matches(split: FeatureSplit, cfg: Config) -> None:
    """Refuse a store whose encoders or fields differ from what the config asks for."""
    enc = split.manifest["encoders"]
    for m in cfg.model.adapters.enabled():
        want = getattr(cfg.encoders, m)
        if m not in enc:
            raise UserError(f"{split.path} has no {m} features, but model.adapters.{m} needs them; re-extract with: {EXTRACT_HINT}")
        have = enc[m]
        # Keys a version-1 manifest lacks read as their default (no spatial pooling).
        for key, default in (("model", None), ("revision", None), ("layer", None), ("pool", 1)):
            if not hasattr(want, key) or (key not in have and default is None):
                continue
            if have.get(key, default) != getattr(want, key):
                raise UserError(
                    f"{split.path}: encoders.{m}.{key} is {getattr(want, key)!r} in the config but {have.get(key, default)!r} "
                    f"in the store (encoder fingerprint {split.encoder_fingerprint}); re-extract with: {EXTRACT_HINT} --overwrite"
                )


def check_dequantisable(split: FeatureSplit, reference: FeatureSplit, modalities: list[str]) -> None:
    """Refuse a quantised split whose manifest lacks the statistics its `modalities`' tokens were
    z-scored with, naming how the model was trained (`reference`, its training store) and how
    the split stores its tokens: without them the codes are numbers on no known scale. Float
    tokens need nothing, whatever the model was trained on, and a quantised split that has its
    statistics is dequantised for any model."""
    if not split.quantized:
        return
    missing = [m for m in modalities if m not in (split.manifest.get("quantization") or {})]
    if missing:
        trained = "" if reference is split else f"the run was trained on {reference.token_dtype} tokens ({reference.path}); "
        raise UserError(
            f"{split.path} holds {split.token_dtype} tokens but its manifest does not say how to dequantise "
            f"{', '.join(missing)} tokens (no quantization.{missing[0]}); {trained}convert the store again with: "
            f"python -m edge_glass.features convert SRC DST --token_dtype {split.token_dtype}"
        )


def open_checked_split(cfg: Config, split: str, features_dir: str | Path | None = None) -> FeatureSplit:
    """One split of the config's store (or of `features_dir`, another store of the same encoders,
    e.g. its int8 conversion), refused if its encoders differ from the config's or its tokens
    cannot be dequantised."""
    opened = open_store(features_dir or cfg.data.features_dir, split, cfg.data.store_format, cfg.data.max_open_shards)
    reference = opened
    if features_dir is not None:
        reference = open_store(cfg.data.features_dir, cfg.data.splits.train, cfg.data.store_format)
        check_same_encoders(opened, reference)
    check_store_matches(opened, cfg)
    check_dequantisable(opened, reference, cfg.model.adapters.enabled())
    return opened
