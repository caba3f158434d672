"""One feature shard as one HDF5 file.

Layout (N samples; per modality m):

    /keys, /captions, /meta          [N] utf-8 strings (meta is the raw sample's JSON)
    /m/tokens                        [sum of lengths, D] fp16, flat (see block.py for why)
    /m/offsets                       [N + 1] int64
    /m/pooled                        [N, P] fp16

Datasets are chunked along the sample (row) axis so a run of samples is one slice and touches
few chunks, and written with `track_times=False` so the same features give the same bytes:
a resumed extraction is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.utils.errors import UserError

_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast block reads, small enough to slice


def _rows_per_chunk(row_bytes: int, rows: int) -> int:
    return max(1, min(rows, _CHUNK_BYTES // max(row_bytes, 1)))


def write_hdf5_shard(path: Path, block: FeatureBlock, attrs: dict) -> None:
    """Write `block` to `path` (the caller renames a temporary path into place)."""
    with h5py.File(path, "w") as f:
        n = len(block)
        for name, values in (("keys", block.keys), ("captions", block.captions), ("meta", block.meta)):
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR, track_times=False)
        for m, arrays in block.modalities.items():
            g = f.create_group(m)
            tok = arrays.tokens
            g.create_dataset(
                "tokens", data=tok, chunks=(_rows_per_chunk(tok.itemsize * tok.shape[1], max(len(tok), 1)), tok.shape[1]),
                track_times=False,
            )
            g.create_dataset("offsets", data=arrays.offsets, track_times=False)
            pooled = arrays.pooled
            g.create_dataset(
                "pooled", data=pooled, chunks=(_rows_per_chunk(pooled.itemsize * pooled.shape[1], max(n, 1)), pooled.shape[1]),
                track_times=False,
            )
        for k, v in attrs.items():
            f.attrs[k] = v


class Hdf5Shard:
    """Read access to one HDF5 feature shard; the file is opened lazily (fork-safe in workers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        # Dataset handles, looked up once: h5py's name lookup costs ~50 us a call, as much as
        # reading a small block, and the loader reads every block of every epoch.
        self._datasets: dict[str, h5py.Dataset] = {}

    def _open(self) -> h5py.File:
        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise UserError(f"{self.path}: cannot open HDF5 feature shard ({e}); re-run extraction with --overwrite") from None
        return self._file

    def _ds(self, name: str) -> h5py.Dataset:
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._datasets[name] = self._open()[name]
        return ds

    def __len__(self) -> int:
        return int(self._ds("keys").shape[0])

    @property
    def modalities(self) -> list[str]:
        return [k for k in self._open().keys() if isinstance(self._open()[k], h5py.Group)]

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop): one slice per dataset, whatever the lengths. Without
        `with_meta` the per-sample JSON is left unread (training never looks at it)."""
        try:
            keys = [s.decode() for s in self._ds("keys")[start:stop]]
            captions = [s.decode() for s in self._ds("captions")[start:stop]]
            meta = [s.decode() for s in self._ds("meta")[start:stop]] if with_meta else [""] * len(keys)
            arrays = {}
            for m in modalities if modalities is not None else self.modalities:
                offsets = self._ds(f"{m}/offsets")[start : stop + 1]
                tokens = self._ds(f"{m}/tokens")[offsets[0] : offsets[-1]]
                arrays[m] = ModalityArrays(tokens, (offsets - offsets[0]).astype(np.int64), self._ds(f"{m}/pooled")[start:stop])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{self.path}: corrupt feature shard reading samples {start}..{stop - 1}: {e}") from None
        return FeatureBlock(keys, captions, meta, arrays)

    def close(self) -> None:
        if self._file is not None:
            self._datasets.clear()
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a fork/pickle; workers reopen on first read.
        return {"path": self.path, "_file": None, "_datasets": {}}
