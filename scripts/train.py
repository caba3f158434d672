#!/usr/bin/env python
"""Train (or resume) an experiment under DeepSpeed.

The command lives in edge_glass/commands/train.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/train.py --help` lists the options.
"""

from edge_glass.commands.train import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
