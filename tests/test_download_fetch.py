"""http_fetch against a real local HTTP server: every failure has its reason, only healable ones
are retried, a slow server cannot stall a fetch past its timeout, and mirrors redirect without
changing what the failure says."""

from __future__ import annotations

import time

import pytest
from helpers.download_world import fast_policy, server  # noqa: F401 (fixture)
from helpers.media_server import image_bytes

from edge_glass.data.http_fetch import FetchFailed, FetchPolicy, FetchStats, fetch, parse_mirrors
from edge_glass.utils.errors import UserError


def _fails(url: str, policy: FetchPolicy) -> FetchFailed:
    with pytest.raises(FetchFailed) as e:
        fetch(url, policy)
    return e.value


def test_a_good_url_returns_its_bytes(server):
    body = image_bytes(1)
    stats = FetchStats()
    assert fetch(server.add("/a.png", body), fast_policy(), stats) == body
    assert (stats.requests, stats.retries, stats.bytes) == (1, 0, len(body))


def test_urls_with_spaces_and_non_ascii_are_escaped_not_refused(server):
    body = image_bytes(5)
    server.add("/my%20photos/caf%C3%A9.png", body)  # what arrives once the client escapes the path
    assert fetch(server.url("/my photos/café.png"), fast_policy()) == body


def test_404_is_bad_url_and_not_retried(server):
    url = server.add("/gone.jpg", b"", status=404)
    e = _fails(url, fast_policy(retries=3))
    assert e.reason == "bad_url" and "HTTP 404" in e.detail and url in e.detail
    assert server.hits["/gone.jpg"] == 1  # a 404 will not heal; asking again only costs time


def test_a_failure_that_heals_is_retried(server):
    body = image_bytes(2)
    url = server.add("/flaky.jpg", body, fail_first=2)
    stats = FetchStats()
    assert fetch(url, fast_policy(retries=2), stats) == body
    assert server.hits["/flaky.jpg"] == 3 and stats.retries == 2


def test_5xx_after_the_retries_is_http_error(server):
    url = server.add("/down.jpg", b"x", status=500)
    e = _fails(url, fast_policy(retries=1))
    assert e.reason == "http_error" and "HTTP 500" in e.detail and "after 2 attempts" in e.detail
    assert server.hits["/down.jpg"] == 2


def test_a_slow_server_times_out_within_the_deadline(server):
    url = server.add("/slow.jpg", image_bytes(3), delay_s=3.0)
    started = time.monotonic()
    e = _fails(url, fast_policy(timeout_s=0.3, retries=1))
    elapsed = time.monotonic() - started
    assert e.reason == "timeout" and server.hits["/slow.jpg"] == 2
    assert elapsed < 1.5, f"two 0.3 s attempts took {elapsed:.1f} s"


def test_refused_connection_is_network(server):
    port = int(server.base.rsplit(":", 1)[1])
    server.stop()  # nothing listens there any more
    e = _fails(f"http://127.0.0.1:{port}/x.jpg", fast_policy(retries=0))
    assert e.reason == "network"


def test_malformed_urls_are_bad_url_without_a_request():
    for url in ("", "ftp://example.org/a.jpg", "not a url", "http://"):
        assert _fails(url, fast_policy()).reason == "bad_url"


def test_bodies_over_the_limit_are_too_large(server):
    url = server.add("/big.bin", b"0" * 5000)
    e = _fails(url, fast_policy(max_bytes=1000))
    assert e.reason == "too_large"


def test_a_mirror_serves_the_url_and_failures_name_the_original(server):
    body = image_bytes(4)
    server.add("/mirror/images/a.png", body)
    policy = fast_policy(mirrors=parse_mirrors([f"https://images.example.org/={server.url('/mirror/images/')}"]))
    assert fetch("https://images.example.org/a.png", policy) == body
    e = _fails("https://images.example.org/missing.png", policy)
    # The record must not depend on the mirror's port, so it names the dataset's URL.
    assert e.reason == "bad_url" and e.detail.startswith("https://images.example.org/missing.png (via mirror)")
    assert server.base not in e.detail


@pytest.mark.parametrize("spec", ["no-equals", "=http://x/", "http://a/="])
def test_malformed_mirror_is_a_user_error(spec):
    with pytest.raises(UserError, match="--mirror expects OLD_PREFIX=NEW_PREFIX"):
        parse_mirrors([spec])


def test_policy_refuses_nonsense():
    with pytest.raises(UserError, match="--timeout"):
        FetchPolicy(timeout_s=0)
    with pytest.raises(UserError, match="--retries"):
        FetchPolicy(retries=-1)
    with pytest.raises(UserError, match="--fetch_workers"):
        FetchPolicy(workers=0)
