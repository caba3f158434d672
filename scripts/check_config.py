#!/usr/bin/env python
"""Validate an experiment config (with overrides) and print the resolved YAML.

The command lives in edge_glass/commands/check_config.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/check_config.py --help` lists the options.
"""

from edge_glass.commands.check_config import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
