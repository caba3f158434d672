"""One writer per run directory and per store split.

Two trainings with the same `experiment.name` (a job resubmitted while the first still runs)
would each prune the other's checkpoints and interleave `metrics.jsonl`; two extractions into
one split would delete each other's in-flight temporaries. A writer holds `fcntl.flock` on
`<dir>/.lock` for as long as it writes: the kernel releases it when the process ends, however
it ends, so a crashed run resumes without anyone deleting a stale lock file. The file holds the
holder's host, PID, start time and command, which the refused second writer prints.

In a distributed job only rank 0 takes the lock (`hold_collectively`); the other ranks learn
the outcome through a collective, so a refusal stops every rank with the same line.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge_glass.utils import distributed as D
from edge_glass.utils.errors import AgreedError, UserError

LOCK = ".lock"


class DirLock:
    """An exclusive, process-lifetime lock on a directory."""

    def __init__(self, directory: str | os.PathLike, what: str) -> None:
        self.directory, self.what = Path(directory), what
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{self.directory} is being written by another {self.what} ({holder}); wait for it to end or stop it "
                "(a crashed one releases the directory by itself)"
            ) from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['started']}: {info['command']}"
    except (ValueError, KeyError, OSError):
        return "holder unknown"


@contextmanager
def hold_collectively(directory: str | os.PathLike, what: str) -> Iterator[None]:
    """Rank 0 holds the directory's lock for the block; every rank raises if it is taken."""
    lock = DirLock(directory, what) if D.rank() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    error = D.broadcast_object(error)
    if error is not None:
        raise AgreedError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
