"""Shared pytest setup: offline, CPU, and helpers to run the scripts as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never touch the hub or a GPU; set this before transformers or deepspeed are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants. Killing the process group is not enough:
    torch 2.13's torchrun starts each rank in a session of its own, so ranks would outlive it."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_script(script: str, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` with this interpreter, as a user would, capturing its output;
    on timeout the whole process tree is killed, so no rank is left behind."""
    cmd = [sys.executable, str(REPO / "scripts" / script), *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{script} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def local_model_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full local model set (`scripts/make_local_models.py`'s), built once per test session
    for the end-to-end tests that run a user's commands (quickstart, the experiment twins);
    `make_local_models.py` on a directory that holds it skips every model."""
    from edge_glass.local_models.build import build_local_models

    out = tmp_path_factory.mktemp("local-model-set") / "local"
    build_local_models(out, include_real=True, seed=0)
    return out
