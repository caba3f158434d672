#!/usr/bin/env python
"""The CPU quickstart, end to end, on the offline local models and the synthetic tri-modal set.

The command lives in edge_glass/commands/quickstart.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/quickstart.py --help` lists the options.
"""

from edge_glass.commands.quickstart import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
