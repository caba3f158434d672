"""scripts/download_datasets.py on a real source, as a user runs it: broken links are skipped,
counted and reported while the run succeeds; a re-run skips finished shards without fetching
them again; kill -9 mid-download and a re-run give the same bytes as an uninterrupted run;
other parameters on an existing directory, options that do not apply, and an unreachable hub
are each one error line."""

from __future__ import annotations

import json
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, kill_tree, run_script
from helpers.download_world import TIMEOUT_S, digests, hf_cache, pixmo_cap_world, server  # noqa: F401 (fixtures)

from edge_glass.utils.errors import UserError

SCRIPT = "download_datasets.py"


@pytest.fixture(scope="module")
def main():
    """The script's main(), run in this process (a second or two cheaper per run than a subprocess)."""
    return runpy.run_path(str(REPO / "scripts" / SCRIPT))["main"]


def _args(world, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "pixmo_cap", "--num_samples", str(len(world.urls)), "--out", str(out),
        "--hf_path", str(world.table), "--shard_size", "4",
        "--timeout", str(TIMEOUT_S), "--retries", "1", "--fetch_workers", "4", *extra,
    ]


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


@pytest.mark.slow
def test_script_skips_and_reports_broken_links_and_a_rerun_fetches_nothing(server, tmp_path, main, capsys):
    world = pixmo_cap_world(server, tmp_path / "table")
    out = tmp_path / "out"
    r = run_script(SCRIPT, *_args(world, out), timeout=120)
    assert r.returncode == 0, r.stderr
    kept = len(world.bodies)
    reasons = "bad_url 1, timeout 1, too_small 1, undecodable 2"
    assert f"kept {kept} of {len(world.urls)} candidate samples; skipped 5 ({reasons}); see {out / 'skipped.json'}" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("done in")
    report = json.loads((out / "skipped.json").read_text())
    assert report["skipped"] == 5 and sorted(e["url"] for e in report["samples"]) == sorted(world.broken)
    # (a split can be empty: splits come from hashing the URLs, and the server's port is in them)
    assert sum(json.loads(p.read_text())["total"] for p in out.glob("*/index.json")) == kept

    before = dict(server.hits)
    capsys.readouterr()
    assert main(_args(world, out)) == 0
    again = capsys.readouterr()
    assert "finished shard(s)" in again.err and "0 written" in again.out
    assert dict(server.hits) == before  # nothing was downloaded again


@pytest.mark.slow
def test_rerun_with_other_parameters_or_options_is_refused(server, tmp_path, main):
    world = pixmo_cap_world(server, tmp_path / "table", slow=False)
    out = tmp_path / "out"
    assert main(_args(world, out)) == 0
    before = digests(out)

    line = _one_error_line(run_script(SCRIPT, *_args(world, out, "--seed", "1"), timeout=120))
    assert "seed=0 there, 1 now" in line and "--overwrite" in line
    with pytest.raises(UserError, match=r"split_fractions=\[0.7, 0.15, 0.15\] there, \[0.8, 0.1, 0.1\] now"):
        main(_args(world, out, "--split_fractions", "0.8", "0.1", "0.1"))
    with pytest.raises(UserError, match="--image_size does not apply to --dataset pixmo_cap .*--hf_path"):
        main(_args(world, out, "--image_size", "32"))
    with pytest.raises(UserError, match="--source_caps does not apply to --dataset pixmo_cap"):
        main(_args(world, out, "--source_caps", "pixmo-docs=1"))
    assert digests(out) == before  # nothing was touched
    assert main(_args(world, out, "--seed", "1", "--overwrite")) == 0
    assert json.loads((out / "dataset.json").read_text())["params"]["seed"] == 1


@pytest.mark.slow
def test_unreachable_hub_is_one_error_line(tmp_path):
    r = run_script(SCRIPT, "--dataset", "pixmo_cap", "--num_samples", "5", "--out", str(tmp_path / "o"), timeout=120)
    line = _one_error_line(r)
    assert "'allenai/pixmo-cap'" in line and "--hf_path" in line
    assert not (tmp_path / "o").exists()  # nothing was written before the source was known


@pytest.mark.slow
def test_kill_9_mid_download_then_rerun_equals_an_uninterrupted_run(server, tmp_path, main):
    world = pixmo_cap_world(server, tmp_path / "table", good=24, slow=False)
    assert main(_args(world, tmp_path / "reference")) == 0

    out = tmp_path / "killed"
    server.delay_s = 0.1  # slow every answer down so the run is still busy when it is killed
    cmd = [sys.executable, str(REPO / "scripts" / SCRIPT), *_args(world, out, "--fetch_workers", "2")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = out / "train" / "shard-000000.json"
    try:
        deadline = time.monotonic() + 60
        while not first.exists():
            assert proc.poll() is None, f"the run ended before its first shard:\n{proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no shard finished within 60 s"
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train" / "index.json").exists() and not (out / "skipped.json").exists()  # really mid-run

    done_urls = {json.loads(m)["image_url"] for m in _shard_jsons(out / "train" / "shard-000000.tar")}
    before = dict(server.hits)
    server.delay_s = 0.0
    r = run_script(SCRIPT, *_args(world, out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "finished shard(s)" in r.stderr
    assert digests(out) == digests(tmp_path / "reference")
    assert all(server.hits[u[len(server.base):]] == before[u[len(server.base):]] for u in done_urls)  # not re-fetched


def _shard_jsons(shard: Path) -> list[bytes]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]
