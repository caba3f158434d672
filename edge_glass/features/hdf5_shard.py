"""One feature shard as one HDF5 file.

Layout (N samples; per modality m):

    /keys, /captions, /meta          [N] utf-8 strings (meta is the raw sample's JSON)
    /m/tokens                        [sum of lengths, D] fp16, flat (see block.py for why)
    /m/offsets                       [N + 1] int64
    /m/pooled                        [N, P] fp16

The numeric datasets are stored *contiguous* (unchunked, uncompressed): a run of samples is one
slice, and the reader maps each dataset's bytes straight into numpy (`np.memmap` at the offset
HDF5 reports), so reading a block is a view of the page cache instead of a copy through h5py,
which also holds the GIL while it copies. The loader's batch gather is then the only copy
(benchmarks/loader.py). Everything is written with `track_times=False` so the same features give
the same bytes: a resumed extraction is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.utils.errors import UserError

_STR = h5py.string_dtype("utf-8")


def write_hdf5_shard(path: Path, block: FeatureBlock, attrs: dict) -> None:
    """Write `block` to `path` (the caller renames a temporary path into place)."""
    with h5py.File(path, "w") as f:
        for name, values in (("keys", block.keys), ("captions", block.captions), ("meta", block.meta)):
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR, track_times=False)
        for m, arrays in block.modalities.items():
            g = f.create_group(m)
            g.create_dataset("tokens", data=arrays.tokens, track_times=False)
            g.create_dataset("offsets", data=arrays.offsets, track_times=False)
            g.create_dataset("pooled", data=arrays.pooled, track_times=False)
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
        self._text: dict[str, list[str]] = {}

    def _open(self) -> h5py.File:
        if self._file is None:
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise UserError(f"{self.path}: cannot open HDF5 feature shard ({e}); re-run extraction with --overwrite") from None
        return self._file

    def _ds(self, name: str) -> h5py.Dataset | np.ndarray:
        """The dataset as a read-only memory map when it is contiguous, else the h5py handle."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = self._open()[name]
            offset = ds.id.get_offset() if ds.chunks is None and ds.dtype.kind in "fiu" else None
            if offset is not None and ds.size:
                # Copy-on-write: the map is writable as far as numpy/torch know (no torch
                # warning on wrapping it), and nothing is ever written back to the file.
                # A plain ndarray view: slicing a np.memmap subclass costs ~10 us of Python each.
                ds = np.memmap(self.path, mode="c", dtype=ds.dtype, offset=offset, shape=ds.shape).view(np.ndarray)
            self._datasets[name] = ds
        return ds

    def _strings(self, name: str) -> list[str]:
        """A whole string dataset, decoded once: a shard's keys or captions are a few hundred KB,
        and reading them through h5py block by block cost as much as the feature arrays."""
        if name not in self._text:
            self._text[name] = [s.decode() for s in self._open()[name][:]]
        return self._text[name]

    def __len__(self) -> int:
        return int(self._ds("keys").shape[0])

    @property
    def modalities(self) -> list[str]:
        return [k for k in self._open().keys() if isinstance(self._open()[k], h5py.Group)]

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop): one slice per dataset, whatever the lengths. Without
        `with_meta` the per-sample JSON is left unread (training never looks at it)."""
        try:
            keys = self._strings("keys")[start:stop]
            captions = self._strings("captions")[start:stop]
            meta = self._strings("meta")[start:stop] if with_meta else [""] * len(keys)
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
            self._text.clear()
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict:
        # An open h5py handle cannot cross a fork/pickle; workers reopen on first read.
        return {"path": self.path, "_file": None, "_datasets": {}, "_text": {}}
