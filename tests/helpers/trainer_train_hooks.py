"""`scripts/train.py`, unchanged, with two test hooks on each logged training step.

Launch it exactly like scripts/train.py (python or torchrun). Both hooks act right after the
trainer writes (rank 0) or would write (other ranks) a `kind: train` record of metrics.jsonl:

    TRAINER_TEST_STEP_DELAY=S       sleep S seconds on every rank. A tiny run does ~20 steps/s,
                                    faster than a test can watch it; sleeping changes no
                                    computation, so losses and weights are a plain run's.
    TRAINER_TEST_FAIL_AT=RANK:STEP  raise RuntimeError on that rank only, after that step: a
                                    failure on one rank while the others carry on.
    TRAINER_TEST_ENOSPC_STEP=N      every torch.save into checkpoint step<N> fails the way a full
                                    disk makes it fail (OSError ENOSPC), on every rank.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

from edge_glass.training import run_log

DELAY = float(os.environ.get("TRAINER_TEST_STEP_DELAY", "0"))
FAIL_AT = os.environ.get("TRAINER_TEST_FAIL_AT")
_write = run_log.MetricsLog.write


def _hooked_write(self, record: dict) -> None:
    _write(self, record)
    if record.get("kind") != "train":
        return
    if FAIL_AT:
        rank, step = (int(x) for x in FAIL_AT.split(":"))
        if int(os.environ.get("RANK", "0")) == rank and record["step"] == step:
            raise RuntimeError(f"injected test failure on rank {rank} after step {step}")
    if DELAY:
        time.sleep(DELAY)


run_log.MetricsLog.write = _hooked_write

ENOSPC_STEP = os.environ.get("TRAINER_TEST_ENOSPC_STEP")
if ENOSPC_STEP:
    import errno

    import torch

    _save = torch.save

    def _full_disk_save(obj, f, *args, **kwargs):
        if f"step{ENOSPC_STEP}" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = _full_disk_save
script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
