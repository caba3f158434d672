#!/usr/bin/env python
"""Search a split of a run's feature store, or a folder of files, with text, an image or a clip.

The command lives in edge_glass/commands/search.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/search.py --help` lists the options.
"""

from edge_glass.commands.search import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
