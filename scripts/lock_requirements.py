#!/usr/bin/env python
"""Regenerate requirements.lock: every package of the CPU environment, pinned.

    python scripts/lock_requirements.py            # resolves requirements.txt with pip, writes requirements.lock

`requirements.txt` pins what the project chooses (torch, deepspeed, transformers, ...); the lock
adds every package those pull in, at the versions pip resolves today, so CI and a fresh install
get the environment the suite last passed in. pip resolves without installing
(`--dry-run --ignore-installed --report`), so the lock does not depend on what this venv holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = """\
# The CPU environment, every package pinned (CI installs this: .ci/run). Generated from
# requirements.txt by `python scripts/lock_requirements.py`; edit requirements.txt, then regenerate.
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "-r", str(REPO / "requirements.txt"), "--report", str(report)], check=True)
        installs = json.loads(report.read_text())["install"]
    pins = sorted(f"{i['metadata']['name'].lower().replace('_', '-')}=={i['metadata']['version']}" for i in installs)
    (REPO / "requirements.lock").write_text(HEADER + "\n".join(pins) + "\n")
    print(f"requirements.lock: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
