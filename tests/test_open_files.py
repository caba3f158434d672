"""Bounded open shards and open-file errors (`edge_glass.features.open_files`).

What is tested:
- `ShardCache`: at most `capacity` handles open, least recently used closed first (through the
  handle's `close()`); a handle is never closed while a `use` block holds it, checked with
  reader threads; an open handle is reused; many threads opening the same key at once end up
  with one handle (a duplicate is closed); `close()` closes everything.
- `open_error`: one line naming the path and the reason (missing file, too many open files,
  a size other than the manifest's, permission).
- `ensure_file_limit` and `reserve_files`, run in a subprocess with a lowered RLIMIT_NOFILE
  (this process's limits are never changed): a limit too low for the request is a UserError
  naming the limit and both fixes; a low soft limit under a high hard limit is raised instead.
"""

from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edge_glass.features.open_files import ShardCache, file_limit, open_error
from edge_glass.utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class FakeHandle:
    """A shard handle that records its closing, and whether it was closed under a reader."""

    def __init__(self, key):
        self.key = key
        self.closed = False
        self.readers = 0
        self.closed_under_reader = False
        self._lock = threading.Lock()

    def read(self):
        assert not self.closed, f"read from closed handle {self.key}"
        return self.key

    def close(self):
        with self._lock:
            if self.readers:
                self.closed_under_reader = True
            self.closed = True


class Opener:
    """`opener(key)` for a ShardCache that keeps every handle it made, in order."""

    def __init__(self, delay: float = 0.0):
        self.handles: list[FakeHandle] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, key):
        if self.delay:
            time.sleep(self.delay)
        handle = FakeHandle(key)
        with self._lock:
            self.handles.append(handle)
        return handle

    def of(self, key) -> list[FakeHandle]:
        return [h for h in self.handles if h.key == key]

    def open_keys(self) -> set:
        return {h.key for h in self.handles if not h.closed}


def read_through(cache: ShardCache, key, hold: float = 0.0):
    """A reader: use the shard, read from it (for `hold` seconds), check it stayed open."""
    with cache.use(key) as handle:
        with handle._lock:
            handle.readers += 1
        try:
            assert handle.read() == key
            if hold:
                time.sleep(hold)
            assert handle.read() == key
        finally:
            with handle._lock:
                handle.readers -= 1
    return handle


# --- ShardCache ------------------------------------------------------------------------------


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        ShardCache(0, Opener())


def test_cache_keeps_at_most_capacity_handles_open_closing_the_least_recently_used():
    opener = Opener()
    cache = ShardCache(3, opener)
    for key in "abc":
        read_through(cache, key)
    assert opener.open_keys() == set("abc") and len(cache) == 3

    read_through(cache, "a")  # a is now the most recently used; b the least
    read_through(cache, "d")
    assert opener.of("b")[0].closed
    assert opener.open_keys() == set("acd") and len(cache) == 3

    read_through(cache, "e")  # c is now the least recently used
    assert opener.of("c")[0].closed
    assert opener.open_keys() == set("ade")

    for key in range(20):
        with cache.use(key):  # the idle shard is closed before the new one is opened
            assert len(opener.open_keys()) <= 3
        assert len(cache) <= 3
        assert len(opener.open_keys()) <= 3
    assert opener.open_keys() == {17, 18, 19}


def test_an_open_handle_is_reused_not_reopened():
    opener = Opener()
    cache = ShardCache(2, opener)
    handles = {read_through(cache, "a") for _ in range(5)}
    assert len(handles) == 1 and len(opener.of("a")) == 1
    assert cache.opens == 1
    with cache.use("a") as outer, cache.use("a") as inner:  # nested use of the same shard
        assert outer is inner
    assert len(opener.handles) == 1 and not opener.handles[0].closed


def test_a_handle_is_not_closed_while_a_use_block_holds_it():
    """One thread holds shard A while others cycle through many other shards with a cache
    of two; A stays open until released, then the cache closes it like any idle shard."""
    opener = Opener()
    cache = ShardCache(2, opener)
    inside, release = threading.Event(), threading.Event()
    seen_open_while_held: list[bool] = []

    def hold_a():
        with cache.use("A") as handle:
            with handle._lock:
                handle.readers += 1
            inside.set()
            release.wait(timeout=10)
            seen_open_while_held.append(not handle.closed)
            with handle._lock:
                handle.readers -= 1

    holder = threading.Thread(target=hold_a)
    holder.start()
    assert inside.wait(timeout=10)

    errors: list[BaseException] = []

    def cycle(offset: int):
        try:
            for i in range(60):
                read_through(cache, (offset + i) % 25)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=cycle, args=(k * 7,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert not errors, errors
    a = opener.of("A")
    assert len(a) == 1 and not a[0].closed, "A was closed while a use block held it"
    # The other shards were evicted around it: with every worker gone, A and one other remain.
    assert len(opener.handles) > 25
    assert len(cache) == 2

    release.set()
    holder.join(timeout=10)
    assert seen_open_while_held == [True]
    for key in range(3):  # A is idle now and the least recently used: the next shards close it
        read_through(cache, 100 + key)
    assert a[0].closed
    assert not any(h.closed_under_reader for h in opener.handles)


def test_no_handle_is_closed_under_a_concurrent_reader():
    """Eight reader threads hold random shards for a moment each, over twice as many shards as
    the cache keeps open: every close happens when no reader is inside."""
    opener = Opener(delay=0.0005)
    cache = ShardCache(4, opener)
    errors: list[BaseException] = []

    def reader(seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(40):
                read_through(cache, rng.randrange(8), hold=0.0005)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert any(h.closed for h in opener.handles), "the test never made the cache evict"
    assert not any(h.closed_under_reader for h in opener.handles)
    assert len(cache) <= 4  # back within capacity once every reader left
    open_handles = [h for h in opener.handles if not h.closed]
    assert len(open_handles) == len(cache)


def test_concurrent_use_of_one_key_opens_it_once_or_closes_the_duplicate():
    opener = Opener(delay=0.02)  # slow enough that the threads race to open
    cache = ShardCache(4, opener)
    start = threading.Barrier(12)
    got: list[FakeHandle] = []
    got_lock = threading.Lock()

    def use_key():
        start.wait(timeout=10)
        with cache.use("shard") as handle:
            assert not handle.closed
            with got_lock:
                got.append(handle)

    threads = [threading.Thread(target=use_key) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(got) == 12
    assert len({id(h) for h in got}) == 1, "threads were handed different handles for one shard"
    kept = got[0]
    assert not kept.closed
    assert all(h.closed for h in opener.handles if h is not kept)
    assert len(cache) == 1 and cache.opens == 1


def test_close_closes_every_open_handle():
    opener = Opener()
    cache = ShardCache(5, opener)
    for key in range(4):
        read_through(cache, key)
    assert len(opener.open_keys()) == 4
    cache.close()
    assert len(cache) == 0
    assert all(h.closed for h in opener.handles)
    read_through(cache, 0)  # usable again afterwards: a fresh handle
    assert len(opener.of(0)) == 2 and not opener.of(0)[1].closed


def test_an_opener_error_propagates_and_leaves_the_cache_consistent():
    calls = []

    def opener(key):
        calls.append(key)
        if key == "bad":
            raise OSError(errno.EIO, "boom")
        return FakeHandle(key)

    cache = ShardCache(1, opener)
    with pytest.raises(OSError, match="boom"):
        with cache.use("bad"):
            pass
    assert len(cache) == 0
    with cache.use("good") as handle:
        assert handle.read() == "good"
    read_through(cache, "other")  # "good" is idle and can be evicted for it
    assert handle.closed


# --- open_error ------------------------------------------------------------------------------


def one_line(error: UserError) -> str:
    assert isinstance(error, UserError)
    message = str(error)
    assert "\n" not in message
    return message


def test_open_error_for_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "shard-00007.h5"
    message = one_line(open_error(path, FileNotFoundError(errno.ENOENT, "No such file", str(path))))
    assert str(path) in message
    assert "missing" in message


def test_open_error_for_too_many_open_files_names_the_limit_and_both_fixes(tmp_path):
    path = tmp_path / "shard-00001.h5"
    path.write_bytes(b"x" * 10)
    message = one_line(open_error(path, OSError(errno.EMFILE, "Too many open files")))
    assert str(path) in message
    assert "ulimit -n" in message and "data.max_open_shards" in message
    assert str(file_limit()) in message.replace(str(path), "")


def test_open_error_for_a_size_other_than_the_manifests_names_both_sizes(tmp_path):
    path = tmp_path / "shard.h5"
    path.write_bytes(b"x" * 1234)
    message = one_line(open_error(path, OSError(errno.EIO, "Unable to open file"), expected_bytes=5678))
    assert str(path) in message
    rest = message.replace(str(path), "")
    assert "1234" in rest and "5678" in rest


def test_open_error_for_a_permission_problem_says_so(tmp_path):
    path = tmp_path / "shard.h5"
    path.write_bytes(b"x")
    message = one_line(open_error(path, PermissionError(errno.EACCES, "Permission denied")))
    assert str(path) in message and "permission" in message.lower()


def test_open_error_otherwise_includes_the_os_error(tmp_path):
    path = tmp_path / "shard.h5"
    path.write_bytes(b"x" * 8)
    message = one_line(open_error(path, OSError(errno.EIO, "bad superblock"), expected_bytes=8))
    assert str(path) in message and "bad superblock" in message


# --- ensure_file_limit and reserve_files (in a subprocess) -----------------------------------

LIMITS_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, resource
    from edge_glass.features.open_files import ensure_file_limit, reserve_files, RESERVED_FDS
    from edge_glass.utils.errors import UserError

    out = {}
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)

    # 1. A low soft limit under a high enough hard limit: raised, not an error.
    if hard0 == resource.RLIM_INFINITY or hard0 >= 4000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard0))
        ensure_file_limit(1000)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        files = []
        for _ in range(1000):  # and the process can now open that many
            files.append(os.open(os.devnull, os.O_RDONLY))
        for fd in files:
            os.close(fd)
        out["raise"] = {"soft": soft, "hard": hard, "hard0": hard0, "opened": len(files)}
        # Shards alone would fit under the soft limit, but not with the process's own files.
        resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard0))
        ensure_file_limit(990)
        out["raise_margin"] = {"soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                               "open": len(os.listdir("/proc/self/fd"))}

    # 2. Reservations add up against the limit, and end with their token.
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
    room = 300 - len(os.listdir("/proc/self/fd")) - RESERVED_FDS
    first = reserve_files(room // 2)
    second = reserve_files(room // 2)
    try:
        reserve_files(room // 2)
        out["third"] = "fitted"
    except UserError as e:
        out["third"] = str(e)
    del first
    gc.collect()
    try:
        reserve_files(room // 2)
        out["after_release"] = "fitted"
    except UserError as e:
        out["after_release"] = str(e)

    # 3. A hard limit below the request: one line naming the limit and both fixes.
    resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
    try:
        ensure_file_limit(1000)
        out["low"] = None
    except UserError as e:
        out["low"] = str(e)
    out["low_limit_after"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def limits() -> dict:
    """The results of LIMITS_SCRIPT, run once in a child process (one torch import)."""
    proc = subprocess.run(
        [sys.executable, "-c", LIMITS_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ensure_file_limit_fails_with_one_line_naming_the_limit_and_both_fixes(limits):
    message = limits["low"]
    assert message is not None, "ensure_file_limit(1000) passed under a limit of 100"
    assert "\n" not in message
    assert "100" in message and "ulimit -n" in message and "data.max_open_shards" in message
    assert limits["low_limit_after"] == [100, 100]  # nothing was changed on failure


def test_ensure_file_limit_raises_a_low_soft_limit_up_to_the_hard_one(limits):
    if "raise" not in limits:
        pytest.skip("the hard open-file limit here is too low to raise a soft limit to 1000+")
    raised = limits["raise"]
    assert 1000 + 64 <= raised["soft"] <= raised["hard"]
    assert raised["hard"] == raised["hard0"]
    assert raised["opened"] == 1000
    # The need counts what the process has open and a reserve, not the shards alone.
    margin = limits["raise_margin"]
    assert margin["soft"] >= 990 + margin["open"] + 32


def test_reservations_add_up_and_end_when_released(limits):
    assert limits["third"] != "fitted", "three halves of the room fitted under the limit"
    assert "ulimit -n" in limits["third"]
    assert limits["after_release"] == "fitted"
