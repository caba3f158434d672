"""Shared pytest setup: offline, CPU, and helpers to run the scripts as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests never touch the hub or a GPU; set this before transformers or deepspeed are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `scripts/<script>` with this interpreter, as a user would, capturing its output.

    A new session lets a timeout kill the whole process group (torchrun ranks included) instead
    of leaving orphans behind (notes/cpu-stack.md P3).
    """
    cmd = [sys.executable, str(REPO / "scripts" / script), *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd or REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"{script} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def repo() -> Path:
    return REPO
