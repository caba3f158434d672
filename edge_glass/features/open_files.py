"""A bounded number of open feature shards per process, and clear errors when a shard won't open.

A store of 1-10M samples has hundreds to thousands of shards, and an epoch visits them in random
order. Keeping every shard the loader has touched open (as a cache of handles naturally does)
grows with the store and dies at the open-file limit (`ulimit -n`, commonly 1024) part-way
through the first epoch. `ShardCache` keeps at most `capacity` shards open, closes the least
recently used one when another is needed, and never closes a shard a reader thread is using
(`with cache.use(key) as handle`): closing a descriptor under a concurrent `pread` would let the
number be reused by the next `open`, and the read would silently return another file's bytes.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

from edge_glass.utils.errors import UserError

# Descriptors a training process needs besides the store: Python and its imports, torch and
# DeepSpeed (sockets of the process group, the shm op, log files), the run directory's files.
# Measured at ~40 for a 2-rank CPU run; the margin covers launchers and GPU drivers.
RESERVED_FDS = 64


def open_fds() -> int | None:
    """Descriptors this process has open now (None where /proc is not available)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_reserved = 0
_reserved_lock = threading.Lock()


class FileReservation:
    """Held by whatever may open the reserved files; the reservation ends when it is collected."""


def _release(files: int) -> None:
    global _reserved
    with _reserved_lock:
        _reserved -= files


def reserve_files(files: int, setting: str = "data.max_open_shards") -> FileReservation:
    """Count `files` against the open-file limit for as long as the returned object lives
    (a split's shard cache: the train and the val split of a run each hold one)."""
    global _reserved
    with _reserved_lock:
        ensure_file_limit(_reserved + files, setting)
        _reserved += files
    token = FileReservation()
    weakref.finalize(token, _release, files)
    return token


def ensure_file_limit(shards: int, setting: str = "data.max_open_shards") -> None:
    """Make sure `shards` open shard files fit under the open-file limit with what the process
    has open already, raising the soft limit up to the hard one if needed (what an unprivileged
    process may do); otherwise one line naming the limit and both fixes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = shards + (open_fds() or 0) + RESERVED_FDS
    if need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise UserError(
        f"{setting}={shards}: keeping that many feature shards open needs about {need} open files, but the "
        f"open-file limit (ulimit -n) is {soft} (hard limit {hard}); raise it with `ulimit -n {max(need, 4096)}` "
        f"before launching, or lower {setting}"
    )


def open_error(path: Path, error: OSError, expected_bytes: int | None = None, what: str = "feature shard") -> UserError:
    """One line saying why `path` cannot be opened: missing, permission, file limit, truncated."""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        soft = file_limit()
        return UserError(
            f"{path}: cannot open the {what}: too many open files (the open-file limit, ulimit -n, is {soft}); "
            f"raise it with `ulimit -n {max(4 * soft, 4096)}` or lower data.max_open_shards"
        )
    if isinstance(error, FileNotFoundError) or not path.exists():
        return UserError(f"{path}: {what} is missing; re-run extraction (python scripts/extract_features.py --config <your config>)")
    if isinstance(error, PermissionError) or error.errno == errno.EACCES:
        return UserError(f"{path}: cannot open the {what}: permission denied (fix the file's permissions)")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return UserError(
            f"{path}: {what} is {size} bytes but the manifest says {expected_bytes} (truncated or replaced); "
            "re-run extraction with --overwrite"
        )
    return UserError(f"{path}: cannot open the {what} ({error}); re-run extraction with --overwrite")


class ShardCache:
    """At most `capacity` open shards, least recently used closed first, in-use ones never.

    `opener(key)` opens a shard and returns a handle with a `close()`; handles are shared by the
    threads of one process. While every open shard is in use, the cache may briefly hold more
    than `capacity` (one per concurrent user), so a reader never waits on another.
    """

    def __init__(self, capacity: int, opener: Callable[[Hashable], Any]) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._opener = opener
        self._open: OrderedDict[Hashable, Any] = OrderedDict()
        self._users: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.opens = 0  # how many times a shard was opened (tests and benchmarks read it)

    @contextmanager
    def use(self, key: Hashable) -> Iterator[Any]:
        with self._lock:
            handle = self._open.get(key)
            if handle is not None:
                self._open.move_to_end(key)
            self._users[key] = self._users.get(key, 0) + 1
        try:
            if handle is None:
                handle = self._admit(key)
            yield handle
        finally:
            with self._lock:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key]
                self._evict()

    def _admit(self, key: Hashable) -> Any:
        # Opening happens outside the lock (it reads the file); two threads that race to open
        # the same shard keep the first handle and close the second.
        with self._lock:
            self._evict(room_for=1)
        handle = self._opener(key)
        with self._lock:
            existing = self._open.get(key)
            if existing is not None:
                handle.close()
                return existing
            self._open[key] = handle
            self.opens += 1
            return handle

    def _evict(self, room_for: int = 0) -> None:
        """Close idle shards, oldest first, until `room_for` more fit (caller holds the lock)."""
        if len(self._open) + room_for <= self.capacity:
            # The common case, checked before listing the open shards: this runs on every use,
            # dozens of times per batch, in the reader threads, holding the GIL.
            return
        for key in list(self._open):
            if len(self._open) + room_for <= self.capacity:
                return
            if key not in self._users:
                self._open.pop(key).close()

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                handle.close()
            self._open.clear()


class CachedShard:
    """A shard file read through a split's `ShardCache` (a private cache of one when made on its
    own). Readers hold no resources and are equal by path, so readers made on demand for the
    same file share one cache entry. Subclasses say how to `open` it."""

    def __init__(self, path, cache: ShardCache | None = None, expected_bytes: int | None = None,
                 num_samples: int | None = None) -> None:
        self.path = Path(path)
        # Hashed and compared on every cache lookup (dozens per batch): a Path rehashes its parts
        # and compares them in Python, and readers made on demand are equal objects, not the
        # same one, so the dict lookup calls __eq__. A string does both in C.
        self._key = str(self.path)
        self._hash = hash(self._key)
        self.expected_bytes = expected_bytes
        self._num_samples = num_samples
        self.cache = cache if cache is not None else ShardCache(1, lambda shard: shard.open())

    def open(self) -> Any:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, type(self)) and other._key == self._key)

    def __hash__(self) -> int:
        return self._hash
