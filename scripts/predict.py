#!/usr/bin/env python
"""Ask a trained run about new files: answer a question, classify zero-shot, or embed.

The command lives in edge_glass/commands/predict.py (also `edge-glass`'s); this is its shell
for a checkout: `python scripts/predict.py --help` lists the options.
"""

from edge_glass.commands.predict import main
from edge_glass.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
