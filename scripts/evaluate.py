#!/usr/bin/env python
"""Evaluate a run on a split of its feature store.

The command lives in edge_glass/commands/evaluate.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/evaluate.py --help` lists the options.
"""

from edge_glass.commands.evaluate import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
