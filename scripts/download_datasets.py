#!/usr/bin/env python
"""Write a raw dataset as WebDataset shards per split (the README's "Raw data" step).

The command lives in edge_glass/commands/download_datasets.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/download_datasets.py --help` lists the options.
"""

from edge_glass.commands.download_datasets import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
