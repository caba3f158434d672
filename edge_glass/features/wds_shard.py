"""One feature shard as one WebDataset tar: per sample `<key>.txt`, `<key>.json` and one `.npy`
per field (`<key>.vision_tokens.npy`, `<key>.vision_pooled.npy`, and `<key>.vision_scales.npy`
in a quantised store, ...).

Token arrays are stored at their true length, so the tar is as exact as the HDF5 file and both
backends hold identical values. Writing uses `webdataset.TarWriter` with a fixed mtime so the
same features give the same bytes.

Reading for training needs random access to a run of samples (exact resume, equal work per
rank), which a streaming tar reader cannot give without re-reading the shard from the start.
`WdsShard` therefore indexes the tar once with the standard `tarfile` module (member offsets, as
two small integer arrays) and then reads a run of samples with one seek and one contiguous read.
The index lives in the split's `ShardCache`, so only a bounded number of shards' indexes are in
memory at once. Sequential iteration for notebooks goes through the `webdataset` library itself
(`iter_wds_samples`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from edge_glass.features.block import BlockIndex, FeatureBlock, ModalityArrays, copy_rows
from edge_glass.features.open_files import CachedShard, open_error
from edge_glass.utils.errors import UserError


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_wds_shard(path: Path, block: FeatureBlock) -> None:
    """Write `block` to `path` (the caller renames a temporary path into place)."""
    with open(path, "wb") as stream, wds.TarWriter(stream, mtime=0.0, encoder=False) as sink:
        for i, key in enumerate(block.keys):
            sample: dict[str, bytes | str] = {
                "__key__": key,
                "txt": block.captions[i].encode(),
                "json": block.meta[i].encode(),
            }
            for m, arrays in block.modalities.items():
                rows = slice(arrays.offsets[i], arrays.offsets[i + 1])
                sample[f"{m}_tokens.npy"] = _npy_bytes(arrays.tokens[rows])
                if arrays.scales is not None:
                    sample[f"{m}_scales.npy"] = _npy_bytes(arrays.scales[rows])
                sample[f"{m}_pooled.npy"] = _npy_bytes(arrays.pooled[i])
            sink.write(sample)


class _TarIndex:
    """Where each sample's members are: `offsets[i, e]`/`sizes[i, e]` for extension `exts[e]`
    (-1 where sample i lacks it), and the keys in order."""

    def __init__(self, path: Path, expected_bytes: int | None) -> None:
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except OSError as e:
            raise open_error(path, e, expected_bytes) from None
        except tarfile.TarError as e:
            raise UserError(f"{path}: corrupt WebDataset feature shard: {e}; re-run extraction with --overwrite") from None
        self.keys = list(members)
        self.exts = sorted({ext for entry in members.values() for ext in entry})
        column = {ext: e for e, ext in enumerate(self.exts)}
        self.offsets = np.full((len(self.keys), len(self.exts)), -1, dtype=np.int64)
        self.sizes = np.zeros((len(self.keys), len(self.exts)), dtype=np.int64)
        for i, entry in enumerate(members.values()):
            for ext, (off, size) in entry.items():
                self.offsets[i, column[ext]] = off
                self.sizes[i, column[ext]] = size

    def close(self) -> None:
        """Nothing stays open between reads; the cache drops the index."""


class WdsShard(CachedShard):
    """Random access to runs of samples of one WebDataset feature tar (see module docstring)."""

    def open(self) -> _TarIndex:
        return _TarIndex(self.path, self.expected_bytes)

    def __len__(self) -> int:
        if self._num_samples is None:
            with self.cache.use(self) as index:
                self._num_samples = len(index.keys)
        return self._num_samples

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop): one seek and one read covering their members."""
        return self._read(start, stop, modalities, with_meta)[0]

    def _read(self, start: int, stop: int, modalities: list[str] | None, with_meta: bool) -> tuple[FeatureBlock, int, int]:
        """The block and the byte range of the tar it was read from."""
        with self.cache.use(self) as index:
            if stop > len(index.keys):
                raise UserError(f"{self.path}: holds {len(index.keys)} samples, asked for {start}..{stop - 1} (truncated?); "
                                "re-run extraction with --overwrite")
            keys = index.keys[start:stop]
            offsets, sizes = index.offsets[start:stop], index.sizes[start:stop]
            exts = index.exts
        if not keys:
            return FeatureBlock([], [], [], {}), 0, 0
        present = offsets >= 0
        lo = int(offsets[present].min())
        hi = int((offsets + sizes)[present].max())
        try:
            with open(self.path, "rb") as f:
                f.seek(lo)
                data = memoryview(f.read(hi - lo))
        except OSError as e:
            raise open_error(self.path, e, self.expected_bytes) from None
        if len(data) != hi - lo:
            raise UserError(f"{self.path}: truncated WebDataset feature shard; re-run extraction with --overwrite")

        def member(i: int, ext: str) -> memoryview:
            e = exts.index(ext) if ext in exts else -1
            if e < 0 or offsets[i, e] < 0:
                raise UserError(f"{self.path}: sample {keys[i]!r} has no {ext!r} member")
            off = int(offsets[i, e]) - lo
            return data[off : off + int(sizes[i, e])]

        mods = modalities
        if mods is None:
            mods = sorted(ext.removesuffix("_tokens.npy") for ext in exts if ext.endswith("_tokens.npy"))
        arrays = {}
        n = len(keys)
        for m in mods:
            try:
                tokens = [_load_npy(member(i, f"{m}_tokens.npy")) for i in range(n)]
                pooled = np.stack([_load_npy(member(i, f"{m}_pooled.npy")) for i in range(n)])
                scales = None
                if f"{m}_scales.npy" in exts:
                    scales = np.concatenate([_load_npy(member(i, f"{m}_scales.npy")) for i in range(n)])
            except ValueError as e:
                raise UserError(f"{self.path}: corrupt array in samples {keys[0]}..{keys[-1]}: {e}") from None
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum([len(t) for t in tokens], out=offs[1:])
            arrays[m] = ModalityArrays(np.concatenate(tokens), offs, pooled, scales)
        captions = [bytes(member(i, "txt")).decode() for i in range(n)]
        meta = [bytes(member(i, "json")).decode() for i in range(n)] if with_meta else [""] * n
        return FeatureBlock(keys, captions, meta, arrays), lo, hi

    def read_index(self, start: int, stop: int, modalities: list[str], with_meta: bool) -> "WdsBlockIndex":
        """A tar has no cheaper way to a block's lengths than reading the block: the index keeps
        the whole block in memory and copies token rows from there."""
        block, lo, hi = self._read(start, stop, modalities, with_meta)
        return WdsBlockIndex(block, self.path, lo, hi)


class WdsBlockIndex(BlockIndex):
    def __init__(self, block: FeatureBlock, path: Path, lo: int, hi: int) -> None:
        self.block = block
        self.path, self.byte_range = path, (lo, hi)
        self.keys, self.captions, self.meta = block.keys, block.captions, block.meta
        self.lengths = {m: a.lengths for m, a in block.modalities.items()}
        self.pooled = {m: a.pooled for m, a in block.modalities.items()}

    def release_pages(self) -> None:
        lo, hi = self.byte_range
        if hi > lo and hasattr(os, "posix_fadvise"):
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def copy_many(self, modality: str, samples: np.ndarray, tokens: np.ndarray, scales: np.ndarray | None) -> None:
        a = self.block.modalities[modality]
        copy_rows(a.tokens, a.offsets[:-1], a.lengths, samples, tokens)
        if scales is not None:
            copy_rows(a.scales, a.offsets[:-1], a.lengths, samples, scales)


def _load_npy(buf: memoryview) -> np.ndarray:
    """Parse an .npy payload without copying it through a file object more than once."""
    stream = io.BytesIO(buf)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not feature arrays")
    count = int(np.prod(shape)) if shape else 1
    array = np.frombuffer(buf, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


def iter_wds_samples(path: Path) -> Iterator[dict]:
    """Decoded samples of one feature tar, streamed through the `webdataset` library."""
    try:
        yield from _iter_wds_samples(path)
    except (tarfile.TarError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: corrupt WebDataset feature shard: {e}; re-run extraction with --overwrite") from None


def _iter_wds_samples(path: Path) -> Iterator[dict]:
    dataset = wds.WebDataset([str(path)], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for raw in dataset:
        sample = {"key": raw["__key__"], "caption": raw["txt"].decode(), "meta": json.loads(raw["json"])}
        for ext, value in raw.items():
            if ext.endswith(".npy"):
                sample[ext.removesuffix(".npy")] = _load_npy(memoryview(value))
        yield sample
