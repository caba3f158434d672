#!/usr/bin/env python
"""Export a run's trained modules (align or instruct; any ZeRO stage) as plain files.

Run with:
    python scripts/export.py --run runs/quickstart                 # -> runs/quickstart/export/
    python scripts/export.py --run runs/vision_text_qwen --merge   # also the LoRA merged into Qwen
The folder holds model.safetensors (fp32: adapters with their standardisation buffers,
connectors, a trained decoder), config.yaml, manifest.json and export.json, and for Qwen a PEFT
adapter folder (decoder/) and optionally the merged model (decoder_merged/), both loadable with
`from_pretrained`. `scripts/predict.py --run <export folder>` and `edge_glass.inference` load it.
"""

from __future__ import annotations

import argparse

from edge_glass.utils.cli import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--checkpoint", default="best", help="best, latest, or a checkpoint directory")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/export)")
    parser.add_argument("--merge", action="store_true", help="Qwen with LoRA: also save the merged model")
    args = parser.parse_args(argv)

    from edge_glass.export import export_run

    out = export_run(args.run, args.checkpoint, args.out, merge=args.merge)
    print(f"exported {args.run} to {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
