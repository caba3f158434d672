#!/usr/bin/env python
"""Train every variant of an ablation config, then report them as one table.

The command lives in edge_glass/commands/sweep.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/sweep.py --help` lists the options.
"""

from edge_glass.commands.sweep import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
