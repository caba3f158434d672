"""The install files agree: every pin of requirements.txt is in requirements.lock (which CI
installs) at the same version, and the lock pins every package it lists."""

from __future__ import annotations

import re

import pytest

from conftest import REPO


def _pins(path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            out[re.sub(r"[-_.]+", "-", name.lower())] = version
    return out


def test_the_lock_holds_every_requirement_at_its_pinned_version():
    wanted, locked = _pins(REPO / "requirements.txt"), _pins(REPO / "requirements.lock")
    assert len(locked) > len(wanted)
    for name, version in wanted.items():
        assert name in locked, f"{name} is in requirements.txt but not in requirements.lock; run scripts/lock_requirements.py"
        # A local version label (torch's +cpu) is the same release.
        assert locked[name].split("+")[0] == version, f"{name}: requirements.txt {version}, lock {locked[name]}"


def test_ci_and_the_readme_install_from_the_lock():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    command = "pip install -r requirements.lock -e ."
    assert command in ci and command in readme


@pytest.mark.slow
def test_a_wheel_of_the_repo_installs_in_a_fresh_venv_with_its_commands_and_configs(tmp_path):
    import subprocess
    import sys
    import zipfile

    import shutil

    wheels = tmp_path / "wheels"
    # setuptools builds in the checkout's build/ (ignored) and never deletes from it: a module
    # removed since the last build would still ship. Start from none.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("edge_glass-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # The configs and DeepSpeed JSONs travel with the package (edge_glass/utils/shipped.py finds them).
    for shipped in ["configs/cpu/quickstart.yaml", "configs/vision_text_align.yaml", "ds_configs/zero2.json"]:
        assert f"edge_glass/{shipped}" in names, shipped
    assert not any(n.startswith(("tests/", "scripts/", "notebooks/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # --no-deps: the commands' --help needs nothing but the package (the heavy imports are per command).
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    out = subprocess.run([str(venv / "bin" / "edge-glass"), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from edge_glass.cli import COMMANDS

    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS) and {"extract", "train", "evaluate", "predict", "search"} <= set(listed)
    wrong = subprocess.run([str(venv / "bin" / "edge-glass"), "trian"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "did you mean 'train'" in wrong.stderr
