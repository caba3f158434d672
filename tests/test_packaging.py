"""The install files agree: every pin of requirements.txt is in requirements.lock (which CI
installs) at the same version, and the lock pins every package it lists."""

from __future__ import annotations

import re

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
