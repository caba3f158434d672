"""Shared setup for the downloader tests (tests/test_download_*.py): the local media server, a
test-local datasets cache, a fast fetch policy, and a PixMo-Cap table whose URLs include every
kind of broken link.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
from helpers import hf_tables
from helpers.media_server import GARBAGE, MediaServer, image_bytes, truncated

from edge_glass.data.http_fetch import FetchPolicy
from edge_glass.data.raw_shards import prepare_raw_dataset, write_shards

TIMEOUT_S = 0.5  # the "slow" route answers after 4 x this


@pytest.fixture
def server():
    s = MediaServer().start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets' Arrow cache in the test's directory, for this process and for scripts it starts."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def fast_policy(**overrides) -> FetchPolicy:
    kw = dict(timeout_s=TIMEOUT_S, retries=1, backoff_s=0.01, workers=4)
    kw.update(overrides)
    return FetchPolicy(**kw)


def digests(out: Path) -> dict[str, str]:
    """Every file under `out` (relative path -> sha256), hidden leftovers included."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write(source, out: Path, shard_size: int = 4, overwrite: bool = False, **kwargs):
    plan = prepare_raw_dataset(out, source, shard_size=shard_size, overwrite=overwrite)
    return plan, write_shards(plan, **kwargs)


@dataclass
class CapWorld:
    table: Path
    urls: list[str]
    bodies: dict[str, bytes]  # good URL -> the bytes it serves
    broken: dict[str, str]  # broken URL -> the reason it must be skipped with


def pixmo_cap_world(server: MediaServer, root: Path, good: int = 12, slow: bool = True) -> CapWorld:
    """A PixMo-Cap table: `good` fine images (PNG and JPEG), one that needs a retry, and one of
    each failure: 404, truncated JPEG, garbage bytes, too small, (optionally) too slow."""
    urls, bodies, broken = [], {}, {}
    for i in range(good):
        body = image_bytes(i, fmt="JPEG" if i % 2 else "PNG")
        urls.append(server.add(f"/img/{i}.{'jpg' if i % 2 else 'png'}", body))
        bodies[urls[-1]] = body
    flaky = image_bytes(100, fmt="JPEG")
    urls.append(server.add("/flaky.jpg", flaky, fail_first=1))
    bodies[urls[-1]] = flaky
    for path, reason, body, kw in [
        ("/gone.jpg", "bad_url", b"", {"status": 404}),
        ("/truncated.jpg", "undecodable", truncated(image_bytes(101, size=(160, 120), fmt="JPEG")), {}),
        ("/garbage.jpg", "undecodable", GARBAGE, {}),
        ("/tiny.png", "too_small", image_bytes(102, size=(8, 8)), {}),
        *([("/slow.jpg", "timeout", image_bytes(103), {"delay_s": 4 * TIMEOUT_S})] if slow else []),
    ]:
        urls.append(server.add(path, body, **kw))
        broken[urls[-1]] = reason
    hf_tables.pixmo_cap(root, urls)
    return CapWorld(root, urls, bodies, broken)
