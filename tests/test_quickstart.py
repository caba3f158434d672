"""The README's quickstart, end to end, as a shorter twin (fewer samples and steps).

Run with: python -m pytest tests/test_quickstart.py -q
It builds the real local model set, makes synthetic data, extracts features, trains the align
stage under the `deepspeed` launcher on 2 CPU ranks, and evaluates: every step a user runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quickstart_twin_runs_end_to_end_and_learns(tmp_path, local_model_set):
    # The model set is shared with the other end-to-end tests; the quickstart's own
    # make_local_models step then finds every model built and skips it.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "local").symlink_to(local_model_set)
    cmd = [sys.executable, str(REPO / "scripts" / "quickstart.py"), "--workdir", str(tmp_path),
           "--num_samples", "480", "--max_steps", "12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "quickstart done" in proc.stdout
    report = json.loads((tmp_path / "runs/quickstart/eval/test-step12.json").read_text())
    chance = 1 / report["num_samples"]
    full = max(r["dim"] for r in report["rows"])
    vt = [r["R@1"] for r in report["rows"] if r["pair"] == "vision_text" and r["dim"] == full]
    assert len(vt) == 2, "both directions are reported"
    assert min(vt) > 5 * chance, f"vision-text R@1 {vt} is not well above chance {chance:.3f}"
    assert (tmp_path / "runs/quickstart/eval/test-step12.png").stat().st_size > 0

    # The README's "Use a trained model" commands, word for word, on this run.
    commands = _readme_block("## Use a trained model")
    assert len(commands) >= 5
    env = dict(os.environ, PATH=f"{tmp_path / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # The README's commands run from the repository root: here the quickstart's workdir, with
    # the repository's scripts beside its runs.
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    # `.venv/bin/python` as the README writes it: this interpreter, with its environment (a
    # symlink would lose the venv, which Python finds next to the link).
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    shim = tmp_path / ".venv" / "bin" / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=env, start_new_session=True)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if "--classes" in command:
            top = json.loads(proc.stdout.splitlines()[-1])["top"]
            assert [t["class"] for t in top][:1] and abs(sum(t["probability"] for t in top) - 1.0) < 1e-3
        if "search.py" in command:
            assert len(proc.stdout.splitlines()) >= 5  # the table: title, header, 3 rows
    assert (tmp_path / "runs/quickstart/export/model.safetensors").is_file()
    assert (tmp_path / "emb.pt").is_file()

    # A finished quickstart says so, and exits in seconds (no step relaunched).
    started = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, start_new_session=True)
    elapsed = time.perf_counter() - started
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already done") == 5 and "quickstart done" in again.stdout
    assert elapsed < 15, f"a finished quickstart took {elapsed:.1f} s"

    # The feature-store notebook reads the quickstart's store and run right after it.
    from helpers.notebooks import NOTEBOOK_DIR, execute_notebook

    (tmp_path / "configs").symlink_to(REPO / "configs")
    execute_notebook(NOTEBOOK_DIR / "00_feature_store.ipynb", tmp_path, out_dir=tmp_path / "notebooks_executed")


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after `heading` in the README."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    block = section[section.index("```bash") + len("```bash"):]
    return [line for line in block[: block.index("```")].strip().splitlines() if line.strip()]
