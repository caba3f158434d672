"""One feature shard as one WebDataset tar: per sample `<key>.txt`, `<key>.json` and one `.npy`
per field (`<key>.vision_tokens.npy`, `<key>.vision_pooled.npy`, ...).

Token arrays are stored at their true length, so the tar is as exact as the HDF5 file and both
backends hold identical values. Writing uses `webdataset.TarWriter` with a fixed mtime so the
same features give the same bytes.

Reading for training needs random access to a run of samples (exact resume, equal work per
rank), which a streaming tar reader cannot give without re-reading the shard from the start.
`WdsShard` therefore indexes the tar once with the standard `tarfile` module (member offsets)
and then reads a run of samples with one seek and one contiguous read. Sequential iteration
for notebooks goes through the `webdataset` library itself (`iter_wds_samples`).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from edge_glass.features.block import FeatureBlock, ModalityArrays
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
                sample[f"{m}_tokens.npy"] = _npy_bytes(arrays.tokens[arrays.offsets[i] : arrays.offsets[i + 1]])
                sample[f"{m}_pooled.npy"] = _npy_bytes(arrays.pooled[i])
            sink.write(sample)


class WdsShard:
    """Random access to runs of samples of one WebDataset feature tar (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._index: list[dict[str, tuple[int, int]]] | None = None
        self._keys: list[str] = []

    def _build_index(self) -> list[dict[str, tuple[int, int]]]:
        if self._index is None:
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(self.path, "r:") as tar:
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
            except (tarfile.TarError, OSError) as e:
                raise UserError(f"{self.path}: corrupt WebDataset feature shard: {e}; re-run extraction with --overwrite") from None
            self._keys = list(samples)
            self._index = list(samples.values())
        return self._index

    def __len__(self) -> int:
        return len(self._build_index())

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop): one seek and one read covering their members."""
        full = self._build_index()
        if stop > len(full):
            raise UserError(f"{self.path}: holds {len(full)} samples, asked for {start}..{stop - 1} (truncated?); re-run extraction with --overwrite")
        index = full[start:stop]
        keys = self._keys[start:stop]
        if not index:
            return FeatureBlock([], [], [], {})
        lo = min(off for entry in index for off, _ in entry.values())
        hi = max(off + size for entry in index for off, size in entry.values())
        with open(self.path, "rb") as f:
            f.seek(lo)
            data = memoryview(f.read(hi - lo))
        if len(data) != hi - lo:
            raise UserError(f"{self.path}: truncated WebDataset feature shard; re-run extraction with --overwrite")

        def member(i: int, ext: str) -> memoryview:
            try:
                off, size = index[i][ext]
            except KeyError:
                raise UserError(f"{self.path}: sample {keys[i]!r} has no {ext!r} member") from None
            return data[off - lo : off - lo + size]

        mods = modalities
        if mods is None:
            mods = sorted({ext.split("_")[0] for ext in index[0] if ext.endswith("_tokens.npy")})
        arrays = {}
        for m in mods:
            try:
                tokens = [_load_npy(member(i, f"{m}_tokens.npy")) for i in range(len(index))]
                pooled = np.stack([_load_npy(member(i, f"{m}_pooled.npy")) for i in range(len(index))])
            except ValueError as e:
                raise UserError(f"{self.path}: corrupt array in samples {keys[0]}..{keys[-1]}: {e}") from None
            offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
            np.cumsum([len(t) for t in tokens], out=offsets[1:])
            arrays[m] = ModalityArrays(np.concatenate(tokens), offsets, pooled)
        captions = [bytes(member(i, "txt")).decode() for i in range(len(index))]
        meta = [bytes(member(i, "json")).decode() for i in range(len(index))] if with_meta else [""] * len(index)
        return FeatureBlock(keys, captions, meta, arrays)

    def close(self) -> None:
        """Nothing stays open between reads; present for symmetry with Hdf5Shard."""


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
