#!/usr/bin/env python
"""Export a run's trained modules (align or instruct; any ZeRO stage) as plain files.

The command lives in edge_glass/commands/export.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/export.py --help` lists the options.
"""

from edge_glass.commands.export import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
