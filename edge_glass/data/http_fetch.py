"""Fetch one URL's bytes with a hard deadline, bounded retries and a reason for every failure.

Real image and audio datasets (PixMo, Localized Narratives) ship URLs, and a fraction of any web
crawl is dead: 404s, servers that hang, hosts that reset. A download must neither stop at the
first bad link nor hang on a slow one, and it must say afterwards how much it lost and why. So
`fetch` either returns the body or raises `FetchFailed` with one of a few reasons, which the
downloaders count:

    bad_url     malformed URL, or an HTTP 4xx other than 408/429 (the resource is not there)
    http_error  HTTP 5xx, 408 or 429 still failing after the retries
    timeout     no complete answer within `timeout_s` (per attempt, from connect to last byte)
    network     connection refused/reset, DNS failure, TLS error, after the retries
    too_large   the body exceeds `max_bytes`

Only failures that can heal (timeouts, network errors, 5xx/408/429) are retried, after an
exponential backoff; a 404 is final at once. The standard library's urllib is enough here:
requests is not a dependency of this project, and one GET per URL needs no session.

`timeout` on `urlopen` bounds each socket operation, not the whole download, so a server that
dribbles a byte a second would never time out; the read loop therefore checks a deadline
between chunks as well.

Mirrors: `rewrite` replaces URL prefixes (`--mirror OLD=NEW`), so a local copy of, say, the COCO
images or the Localized Narratives recordings can stand in for the original hosts without
changing the dataset's parameters (the content is the same; only where it is read from differs).
"""

from __future__ import annotations

import http.client
import math
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path

FETCH_REASONS = ("bad_url", "http_error", "timeout", "network", "too_large")
_RETRY_STATUS = {408, 429}  # client-side codes that mean "try again later"
_CHUNK = 1 << 16


class FetchFailed(Exception):
    """A URL could not be fetched; `reason` is one of FETCH_REASONS, `detail` says what happened."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FetchPolicy:
    """How hard to try. None of this changes what a successful fetch returns, so it is not part of
    a dataset's parameters: a resumed run may use another timeout or mirror."""

    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 0.5  # before retry k (1-based): backoff_s * 2**(k-1)
    max_bytes: int = 64 << 20
    workers: int = 16  # concurrent fetches (threads: the work is waiting on sockets)
    mirrors: tuple[tuple[str, str], ...] = ()
    user_agent: str = "edge-glass-downloader/1 (+dataset preparation; one request per URL)"

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise UserError(f"--timeout must be positive, got {self.timeout_s}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.workers < 1:
            raise UserError(f"--fetch_workers must be >= 1, got {self.workers}")

    def rewrite(self, url: str) -> str:
        for old, new in self.mirrors:
            if url.startswith(old):
                return new + url[len(old) :]
        return url


def parse_mirrors(specs: list[str] | None) -> tuple[tuple[str, str], ...]:
    """`OLD=NEW` strings (the --mirror option) as prefix pairs; a malformed one is a user error."""
    pairs = []
    for spec in specs or ():
        old, sep, new = spec.partition("=")
        if not sep or not old or not new:
            raise UserError(f"--mirror expects OLD_PREFIX=NEW_PREFIX, got {spec!r}")
        pairs.append((old, new))
    return tuple(pairs)


@dataclass
class FetchStats:
    """Counters shared by the fetching threads (for the run's summary line)."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, retries: int = 0, nbytes: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.bytes += nbytes


def fetch(url: str, policy: FetchPolicy, stats: FetchStats | None = None) -> bytes:
    """The body of `url` (after mirror rewriting), or `FetchFailed` once retries are used up.

    A failure's detail names the URL as the dataset has it, not the mirror's, so the skip records
    of a run do not depend on where a mirror happened to listen."""
    return _with_retries(url, policy, stats, lambda actual: _get_once(actual, policy))


def fetch_to_file(url: str, path: str | os.PathLike, policy: FetchPolicy) -> Path:
    """Download a large file (an annotation dump) to `path`, atomically. Unlike `fetch` there is
    no total deadline and no size cap, only `timeout_s` per read: a 200 MB file may take minutes,
    but it must keep arriving."""
    path = Path(path)

    def attempt(actual: str) -> bytes:
        with atomic_path(path) as tmp, open(tmp, "wb") as sink:
            _get_once(actual, policy, sink)
        return b""

    _with_retries(url, policy, None, attempt)
    return path


def _with_retries(url: str, policy: FetchPolicy, stats: FetchStats | None, attempt_fn: Callable[[str], bytes]) -> bytes:
    actual = policy.rewrite(url)
    via = " (via mirror)" if actual != url else ""
    try:
        actual = _escape(actual)
    except ValueError as e:
        raise FetchFailed("bad_url", f"{url}{via}: {e}") from None
    attempt = 0
    while True:
        try:
            body = attempt_fn(actual)
            if stats is not None:
                stats.add(requests=1, retries=attempt, nbytes=len(body))
            return body
        except FetchFailed as e:
            retryable = e.reason in ("timeout", "network", "http_error")
            if not retryable or attempt >= policy.retries:
                if stats is not None:
                    stats.add(requests=1, retries=attempt)
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise FetchFailed(e.reason, f"{url}{via}: {e.detail}{tries}") from None
            time.sleep(policy.backoff_s * 2**attempt)
            attempt += 1


def _escape(url: str) -> str:
    """`url` as http.client accepts it. Web-crawled URLs hold spaces and non-ASCII characters that
    browsers escape silently and urllib refuses; percent-encode them (existing %XX escapes are
    kept) and IDNA-encode a non-ASCII host."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    try:
        netloc = parts.netloc.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"host cannot be encoded: {parts.netloc!r}") from None
    path = urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=~")
    query = urllib.parse.quote(parts.query, safe="/%:@!$&'()*+,;=~?")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


def _get_once(url: str, policy: FetchPolicy, sink: BinaryIO | None = None) -> bytes:
    """One GET. Into memory with a total deadline and a size cap; or, with `sink`, into a file
    with only the per-read timeout (large downloads)."""
    deadline = time.monotonic() + policy.timeout_s if sink is None else math.inf
    request = urllib.request.Request(url, headers={"User-Agent": policy.user_agent, "Accept": "*/*"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if sink is None and length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchFailed("too_large", f"Content-Length {length} > {policy.max_bytes} bytes")
            chunks, size = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FetchFailed("timeout", f"not complete after {policy.timeout_s:g} s")
                _set_socket_timeout(response, min(remaining, policy.timeout_s))
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
                    continue
                if size > policy.max_bytes:
                    raise FetchFailed("too_large", f"body exceeds {policy.max_bytes} bytes")
                chunks.append(chunk)
            if length and length.isdigit() and size != int(length):
                raise FetchFailed("network", f"got {size} of {length} bytes")
            return b"".join(chunks)
    except FetchFailed:
        raise
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in _RETRY_STATUS:
            raise FetchFailed("bad_url", f"HTTP {e.code}") from None
        raise FetchFailed("http_error", f"HTTP {e.code}") from None
    except (socket.timeout, TimeoutError):
        raise FetchFailed("timeout", f"no answer within {policy.timeout_s:g} s") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (socket.timeout, TimeoutError)):
            raise FetchFailed("timeout", f"no answer within {policy.timeout_s:g} s") from None
        raise FetchFailed("network", f"{e.reason}") from None
    except http.client.InvalidURL as e:
        raise FetchFailed("bad_url", f"{e}") from None
    except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as e:
        # reset mid-body, incomplete read, bad status line, TLS failure: the network, not the URL
        raise FetchFailed("network", f"{type(e).__name__}: {e}") from None
    except ValueError as e:  # urllib's "unknown url type" and similar
        raise FetchFailed("bad_url", f"{e}") from None


def _set_socket_timeout(response, seconds: float) -> None:
    # Shrink the per-read socket timeout to what is left of the deadline. Reaching the socket goes
    # through http.client internals; if that ever changes, the deadline check between chunks
    # still bounds the total to about one timeout_s past the deadline.
    sock = getattr(getattr(getattr(response, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.settimeout(max(seconds, 0.001))
        except OSError:
            pass
