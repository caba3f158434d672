"""`scripts/train.py`, unchanged, on a pretend accelerator peak, so the MFU path runs on CPU.

MFU is reported only where `peak_flops` knows the device (GPUs); this launcher makes it return
FAKE_PEAK FLOP/s, so a CPU test can check that the first step is FLOP-counted and that MFU is
logged consistently with samples/s.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from edge_glass.training import trainer

FAKE_PEAK = 1e12
trainer.peak_flops = lambda device, dtype: FAKE_PEAK
script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
sys.argv[0] = str(script)
runpy.run_path(str(script), run_name="__main__")
