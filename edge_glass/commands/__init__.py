"""The pipeline's commands, one module each with a `main(argv)`: what `edge-glass <command>`
runs (edge_glass/cli.py) and what the checkout's `scripts/*.py` shells call."""
