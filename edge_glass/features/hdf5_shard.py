"""One feature shard as one HDF5 file.

Layout (N samples; per modality m):

    /keys, /captions, /meta          [N] utf-8 strings (meta is the raw sample's JSON)
    /m/tokens                        [sum of lengths, W] flat token rows (see block.py for why),
                                     float16/float32, or int8 / packed int4 codes (quantize.py)
    /m/scales                        [sum of lengths, G] float16, quantised stores only
    /m/offsets                       [N + 1] int64
    /m/pooled                        [N, P] float16/float32

The numeric datasets are stored *contiguous* (unchunked, uncompressed): a sample's token rows
are one byte range at an offset HDF5 reports, so the reader copies them with one `pread` on the
file's descriptor straight into the caller's buffer: one copy, made by the kernel, with the GIL
released, and no memory map (a map's pages count in the reader's resident memory for as long as
it lives, which across a 1M-sample store is the store). h5py reads only the strings and the
layout. Everything is written with `track_times=False` so the same features give the same
bytes: a resumed extraction is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
from h5py import h5d, h5s

from edge_glass.features.block import BlockIndex, FeatureBlock, ModalityArrays, copy_rows
from edge_glass.features.open_files import CachedShard, ShardCache, open_error
from edge_glass.utils.errors import UserError

_STR = h5py.string_dtype("utf-8")
STAGE_BYTES_PER_SAMPLE = 16 * 1024
"""A block whose token rows average at most this per sample is read whole, once (see read_index).
A read per sample has a fixed cost of a few microseconds (system call, Python, zeroing the
padding); a block read whole moves its bytes twice (into memory, then into the batch), which
at 10 GB/s costs about as much once a sample passes ~16 KB. Caption tokens of a 768-wide text
encoder in fp16 (~30 KB a sample) sit near that line: in paired runs at `benchmarks/loader.py`'s
shapes the two paths did not differ beyond the machine's spread, and above it a sample's rows
are moved once."""


def write_hdf5_shard(path: Path, block: FeatureBlock, attrs: dict) -> None:
    """Write `block` to `path` (the caller renames a temporary path into place)."""
    with h5py.File(path, "w") as f:
        for name, values in (("keys", block.keys), ("captions", block.captions), ("meta", block.meta)):
            f.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR, track_times=False)
        for m, arrays in block.modalities.items():
            g = f.create_group(m)
            g.create_dataset("tokens", data=arrays.tokens, track_times=False)
            if arrays.scales is not None:
                g.create_dataset("scales", data=arrays.scales, track_times=False)
            g.create_dataset("offsets", data=arrays.offsets, track_times=False)
            g.create_dataset("pooled", data=arrays.pooled, track_times=False)
        for k, v in attrs.items():
            f.attrs[k] = v


@dataclass(frozen=True)
class _Array:
    """Where a dataset's bytes are: `offset` into the file when contiguous and unfiltered."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None
    row_bytes: int


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def header_files(max_open_shards: int) -> int:
    """How many of a split's `max_open_shards` files are shards opened through HDF5 (the rest are
    plain descriptors; see `_OpenHdf5`)."""
    return max(1, min(8, max_open_shards // 4))


class _Hdf5Header:
    """A shard opened through HDF5: what reading strings and learning the layout needs.

    Each file HDF5 opens costs ~0.6 MB of library state (its metadata cache's index alone is a
    fixed 512 KB table), so the split keeps only a few of these open (`header_files`), in a
    cache of their own: 64 of them were ~40 MB in every rank, and opened and closed across a
    10,000-shard store they left the C allocator holding more. Token rows never need one."""

    def __init__(self, path: Path, expected_bytes: int | None) -> None:
        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise open_error(path, e, expected_bytes) from None
        self.identity = _identity(self.file.id.get_vfd_handle())
        self._string_ids: dict[str, h5d.DatasetID] = {}

    def layout(self, name: str) -> "_Array | None":
        """Where dataset `name`'s bytes are, through h5py's low-level API (its high-level
        properties cost ~70 us a dataset); None when the shard has no such dataset."""
        try:
            dsid = h5d.open(self.file.id, name.encode())
        except KeyError:
            return None
        plist = dsid.get_create_plist()
        contiguous = plist.get_layout() == h5d.CONTIGUOUS and plist.get_nfilters() == 0
        dtype, shape = dsid.dtype, dsid.shape
        offset = dsid.get_offset() if contiguous and dtype.kind in "fiub" else None
        return _Array(shape, dtype, offset, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)

    def strings(self, name: str, start: int, n: int) -> np.ndarray:
        """n strings from `start` of dataset `name` (range checked by the caller), through a
        dataset id opened once per open file: the high-level `file[name][a:b]` resolves the
        name and builds a selection on every call, in a reader thread, holding the GIL."""
        out = np.empty(n, dtype=_STR)
        if n:
            try:
                dsid = self._string_ids.get(name)
                if dsid is None:
                    dsid = self._string_ids[name] = h5d.open(self.file.id, name.encode())
                space = dsid.get_space()
                space.select_hyperslab((start,), (n,))
                dsid.read(h5s.create_simple((n,)), space, out)
            except (OSError, ValueError, TypeError) as e:
                raise UserError(f"{self.path}: corrupt feature shard reading {name} {start}..{start + n - 1}: {e}") from None
        return out

    def close(self) -> None:
        self._string_ids.clear()
        self.file.close()


class _OpenHdf5:
    """An open shard as the loader keeps it: a plain descriptor and, per numeric dataset, where
    its bytes are (learned once per open from the shard's `_Hdf5Header`). Token rows, offsets
    and pooled vectors are `pread` from the descriptor; only strings go through HDF5."""

    def __init__(self, shard: "Hdf5Shard") -> None:
        self.path = shard.path
        self._shard = shard
        try:
            self.fd = os.open(shard.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise open_error(shard.path, e, shard.expected_bytes) from None
        self.size = os.fstat(self.fd).st_size
        self.identity = _identity(self.fd)
        self._arrays: dict[str, _Array | None] = {}

    @contextmanager
    def header(self) -> Iterator[_Hdf5Header]:
        """`with f.header() as h:` the shard opened through HDF5 (from the split's few). The two
        are opened at different times, so the path may name another file by then (a shard
        re-extracted, which renames a new file into place): layout or strings from one file
        and token rows from the other would be plausible and wrong, so that is refused."""
        with self._shard.headers.use(self._shard) as h:
            if h.identity != self.identity:
                raise UserError(f"{self.path}: the shard was replaced while this run was reading it (another "
                                "extraction writing into this store?); let that finish, then restart the run")
            yield h

    def array(self, name: str) -> "_Array":
        """Where dataset `name`'s bytes are (a missing dataset is one clear line)."""
        entry = self.find(name)
        if entry is None:
            raise UserError(f"{self.path}: no dataset {name!r} (not a shard of this store's layout); "
                            "re-run extraction with --overwrite")
        return entry

    def find(self, name: str) -> "_Array | None":
        """`array(name)`, or None when the shard has no such dataset (e.g. no scales: float tokens)."""
        if name not in self._arrays:
            with self.header() as h:
                self._arrays[name] = h.layout(name)
        return self._arrays[name]

    def rows(self, name: str, first: int, out: np.ndarray) -> None:
        """Rows [first, first + len(out)) of dataset `name` into `out` (C-contiguous)."""
        n = len(out)
        if n == 0:
            return
        a = self.array(name)
        offset, row_bytes = a.offset, a.row_bytes
        if first < 0 or first + n > a.shape[0]:
            raise UserError(f"{self.path}: rows {first}..{first + n - 1} of {name} are outside its {a.shape[0]} rows "
                            "(corrupt offsets); re-run extraction with --overwrite")
        if offset is None:  # chunked or compressed (not written by Edge Glass): h5py decodes it
            with self.header() as h:
                h.file[name].read_direct(out, np.s_[first : first + n])
            return
        start = offset + first * row_bytes
        try:
            got = os.preadv(self.fd, [out], start)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read {name}: {e}") from None
        if got != n * row_bytes:
            raise UserError(
                f"{self.path}: truncated feature shard ({self.size} bytes, {name} needs bytes up to "
                f"{start + n * row_bytes}); re-run extraction with --overwrite"
            )

    def drop_pages(self, name: str, first: int, n: int) -> None:
        """posix_fadvise(DONTNEED) on rows [first, first + n) of `name`: the kernel may drop them
        from the page cache (it keeps pages other processes have mapped or dirtied)."""
        a = self.array(name)
        if a.offset is not None and n > 0 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, a.offset + first * a.row_bytes, n * a.row_bytes, os.POSIX_FADV_DONTNEED)

    def rows_into(self, name: str, firsts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """Rows [firsts[k], firsts[k] + counts[k]) of `name` into out[k, :counts[k]], and zeros in
        out[k, counts[k]:] (the loader's buffers are reused). The loader's hot loop: one pread per
        sample with as little Python around it as possible, because a reader thread that holds
        the GIL between two reads delays the other readers' return from theirs."""
        a = self.array(name)
        offset, row_bytes, rows = a.offset, a.row_bytes, a.shape[0]
        t = out.shape[1]
        preadv, fd = os.preadv, self.fd
        got = want = 0
        try:
            for k, (first, n) in enumerate(zip(firsts.tolist(), counts.tolist())):
                if first < 0 or first + n > rows or offset is None:
                    self.rows(name, first, out[k, :n])  # out of range: raises; not contiguous: h5py reads
                else:
                    got += preadv(fd, [out[k] if n == t else out[k, :n]], offset + first * row_bytes)
                    want += n * row_bytes
                if n < t:
                    out[k, n:] = 0
        except OSError as e:
            raise UserError(f"{self.path}: cannot read {name}: {e}") from None
        if got != want:
            raise UserError(f"{self.path}: truncated feature shard ({self.size} bytes, short read of {name}); "
                            "re-run extraction with --overwrite")

    def read_array(self, name: str, start: int, stop: int, zero_row: bool = False) -> np.ndarray:
        """Rows [start, stop) of `name`; with `zero_row`, one more row of zeros after them."""
        a = self.array(name)
        n = max(stop - start, 0)
        out = np.empty((n + zero_row, *a.shape[1:]), dtype=a.dtype)
        self.rows(name, start, out[:n])
        if zero_row:
            out[n] = 0
        return out

    def strings(self, name: str, start: int, stop: int) -> list[str]:
        """Strings [start, stop) of dataset `name`. The range is checked here because h5py's
        slicing clips it: a shard with fewer strings than samples would give a short list, and
        captions paired with the wrong features."""
        a = self.array(name)  # a missing dataset is a clear error
        n = max(stop - start, 0)
        if start < 0 or start + n > a.shape[0]:
            raise UserError(f"{self.path}: strings {start}..{stop - 1} of {name} are outside its {a.shape[0]} rows "
                            "(a damaged shard: fewer strings than samples); re-run extraction with --overwrite")
        with self.header() as h:
            out = h.strings(name, start, n)
        return [s.decode() for s in out.tolist()]

    def close(self) -> None:
        self._arrays.clear()
        os.close(self.fd)


class Hdf5Shard(CachedShard):
    """Read access to one HDF5 feature shard. Holds no open file itself: the split's caches do
    (`cache`: plain descriptors, `headers`: the few shards opened through HDF5; both bounded and
    shared by the loader's threads); a shard made on its own gets private caches of one."""

    def __init__(self, path, cache: ShardCache | None = None, expected_bytes: int | None = None,
                 num_samples: int | None = None, headers: ShardCache | None = None) -> None:
        super().__init__(path, cache, expected_bytes, num_samples)
        self.headers = headers if headers is not None else ShardCache(1, lambda shard: shard.open_header())

    def open(self) -> _OpenHdf5:
        return _OpenHdf5(self)

    def open_header(self) -> _Hdf5Header:
        return _Hdf5Header(self.path, self.expected_bytes)

    def __len__(self) -> int:
        if self._num_samples is None:
            with self.cache.use(self) as f:
                self._num_samples = int(f.array("keys").shape[0])
        return self._num_samples

    @property
    def modalities(self) -> list[str]:
        with self.headers.use(self) as h:
            return [k for k in h.file.keys() if isinstance(h.file[k], h5py.Group)]

    def read(self, start: int, stop: int, modalities: list[str] | None = None, with_meta: bool = True) -> FeatureBlock:
        """Samples [start, stop) with their token rows, as stored (codes and scales when quantised)."""
        modalities = modalities if modalities is not None else self.modalities
        with self.cache.use(self) as f:
            keys, captions, meta = _strings(f, start, stop, with_meta)
            arrays = {}
            for m in modalities:
                offsets = f.read_array(f"{m}/offsets", start, stop + 1)
                a, b = int(offsets[0]), int(offsets[-1])
                scales = f.read_array(f"{m}/scales", a, b) if f.find(f"{m}/scales") else None
                arrays[m] = ModalityArrays(f.read_array(f"{m}/tokens", a, b), offsets - offsets[0],
                                           f.read_array(f"{m}/pooled", start, stop), scales)
        return FeatureBlock(keys, captions, meta, arrays)

    def read_index(self, start: int, stop: int, modalities: list[str], with_meta: bool) -> "Hdf5BlockIndex":
        """Samples [start, stop) without their token rows (the loader's view of a block)."""
        with self.cache.use(self) as f:
            keys, captions, meta = _strings(f, start, stop, with_meta)
            lengths, first_rows, pooled, staged = {}, {}, {}, {}
            for m in modalities:
                offsets = f.read_array(f"{m}/offsets", start, stop + 1)
                first_rows[m] = offsets[:-1]
                lengths[m] = np.diff(offsets)
                pooled[m] = f.read_array(f"{m}/pooled", start, stop)
                if (lengths[m] < 0).any():
                    raise UserError(f"{self.path}: corrupt offsets of {m} in samples {start}..{stop - 1}; "
                                    "re-run extraction with --overwrite")
                a, b = int(offsets[0]), int(offsets[-1])
                if (b - a) * f.array(f"{m}/tokens").row_bytes <= STAGE_BYTES_PER_SAMPLE * (stop - start):
                    # Small rows (caption word pieces): one read for the block beats a read per
                    # sample, whose fixed cost is larger than the copy. A zero row after the
                    # block's rows is what padding slots copy (block.copy_rows).
                    scales = f.read_array(f"{m}/scales", a, b, zero_row=True) if f.find(f"{m}/scales") else None
                    staged[m] = (f.read_array(f"{m}/tokens", a, b, zero_row=True), scales)
        return Hdf5BlockIndex(self, keys, captions, meta, lengths, pooled, first_rows, staged)


def _strings(f: _OpenHdf5, start: int, stop: int, with_meta: bool) -> tuple[list[str], list[str], list[str]]:
    keys = f.strings("keys", start, stop)
    captions = f.strings("captions", start, stop)
    meta = f.strings("meta", start, stop) if with_meta else [""] * len(keys)
    return keys, captions, meta


class Hdf5BlockIndex(BlockIndex):
    def __init__(self, shard: Hdf5Shard, keys, captions, meta, lengths, pooled, first_rows, staged) -> None:
        self.shard = shard
        self.keys, self.captions, self.meta = keys, captions, meta
        self.lengths, self.pooled = lengths, pooled
        self.first_rows = first_rows
        self.staged = staged
        """Per modality with small rows: (token rows, scales or None) of the whole block."""

    def release_pages(self) -> None:
        with self.shard.cache.use(self.shard) as f:
            for m, first in self.first_rows.items():
                if len(first):
                    rows = int(first[-1] + self.lengths[m][-1] - first[0])
                    f.drop_pages(f"{m}/tokens", int(first[0]), rows)
                    if f.find(f"{m}/scales"):
                        f.drop_pages(f"{m}/scales", int(first[0]), rows)

    def copy_many(self, modality: str, samples: np.ndarray, tokens: np.ndarray, scales: np.ndarray | None) -> None:
        first, lengths = self.first_rows[modality], self.lengths[modality]
        if modality in self.staged:
            rows, row_scales = self.staged[modality]
            starts = first - first[0] if len(first) else first
            copy_rows(rows, starts, lengths, samples, tokens, zero_row=len(rows) - 1)
            if scales is not None:
                copy_rows(row_scales, starts, lengths, samples, scales, zero_row=len(row_scales) - 1)
            return
        # One open-shard lookup for the lot: the loader calls this per block and modality.
        firsts, counts = first[samples], lengths[samples]
        with self.shard.cache.use(self.shard) as f:
            f.rows_into(f"{modality}/tokens", firsts, counts, tokens)
            if scales is not None:
                f.rows_into(f"{modality}/scales", firsts, counts, scales)
