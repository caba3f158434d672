#!/usr/bin/env python
"""Run the frozen encoders once over the raw shards and write the feature store.

The command lives in edge_glass/commands/extract_features.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/extract_features.py --help` lists the options.
"""

from edge_glass.commands.extract_features import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
