#!/usr/bin/env python
"""Export a run's trained modules as one consolidated safetensors file (any ZeRO stage).

Run with:
    python scripts/export.py --run runs/quickstart            # -> runs/quickstart/export/
The folder holds model.safetensors (fp32, trainable modules and their standardisation
buffers) and the run's config.yaml, enough to rebuild the modules without DeepSpeed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from edge_glass.training.run_loading import load_alignment_model
    from edge_glass.utils.io import atomic_path

    run = Path(args.run)
    _, model, checkpoint = load_alignment_model(run, args.checkpoint)
    out = Path(args.out) if args.out else run / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"checkpoint": str(checkpoint), "format": "edge_glass.align"})
    shutil.copy2(run / "config.yaml", out / "config.yaml")
    print(f"exported {len(state)} tensors from {checkpoint} to {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    run_main(main)
