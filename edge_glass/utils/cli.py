"""Command-line plumbing shared by every script: user errors as one line, config + overrides."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from edge_glass.utils.errors import AgreedError, UserError


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main(argv)`; a `UserError` becomes `error: <message>` on stderr and exit 2."""
    try:
        code = main(argv)
    except UserError as e:
        if not (isinstance(e, AgreedError) and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` and repeated `--set KEY=VALUE`, the same on every script that reads a config."""
    parser.add_argument("--config", required=required, help="experiment YAML, e.g. configs/cpu/quickstart.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field by its dotted path, e.g. --set optim.lr=3e-4 (repeatable; "
        "VALUE is parsed as YAML, so lists and numbers work)",
    )
