"""`edge-glass <command> ...`: every step of the pipeline from an installed package.

    edge-glass download --dataset synthetic --num_samples 2400 --out data/raw/synthetic
    edge-glass extract --config configs/cpu/quickstart.yaml
    edge-glass train --config configs/cpu/quickstart.yaml          # one process; or, on 2 GPUs:
    deepspeed --num_gpus 2 --module edge_glass.commands.train --config configs/vision_text_align.yaml
    edge-glass evaluate --run runs/quickstart --split test

Each command is a module of `edge_glass/commands/` with a `main(argv)`; the scripts in a
checkout's `scripts/` are the same commands (`python scripts/train.py` = `edge-glass train`).
`--help` here imports nothing heavy, so it answers at once; a command imports what it needs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # command: (module under edge_glass.commands, what it does)
    "quickstart": ("quickstart", "the CPU quickstart, end to end (models, data, store, training, evaluation)"),
    "make-local-models": ("make_local_models", "build the offline local model set"),
    "download": ("download_datasets", "write a raw dataset as WebDataset shards (built-in sources or your own shards)"),
    "extract": ("extract_features", "run the frozen encoders once into the feature store"),
    "check-config": ("check_config", "validate a config and its overrides, print the resolved YAML"),
    "train": ("train", "train or resume a run under DeepSpeed"),
    "sweep": ("sweep", "train every variant of a sweep config, then one report"),
    "evaluate": ("evaluate", "retrieval or QA metrics of a run on a split"),
    "predict": ("predict", "answer, classify or embed new files with a run or an export"),
    "search": ("search", "search a split or a folder of files with text, an image or a clip"),
    "export": ("export", "write a run's trained modules as safetensors (and PEFT / merged decoders)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: edge-glass <command> [options]   (edge-glass <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command {name!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
              " (edge-glass --help lists them)", file=sys.stderr)
        sys.exit(2)
    from edge_glass.utils.cli import run_main

    module = importlib.import_module(f"edge_glass.commands.{COMMANDS[name][0]}")
    sys.argv[0] = f"edge-glass {name}"  # what argparse shows as the program in usage lines
    run_main(module.main, rest)


if __name__ == "__main__":
    main()
