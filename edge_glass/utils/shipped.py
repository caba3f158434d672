"""The experiment configs and DeepSpeed JSONs, reachable from an installed package.

A checkout has them in `configs/` and `ds_configs/`; the package holds the same files as
`edge_glass/configs` and `edge_glass/ds_configs` (links to those folders in a checkout, copies
in a wheel). So `--config configs/cpu/quickstart.yaml` and `train.deepspeed: ds_configs/zero2.json`
mean the same files whether the command runs in a checkout or anywhere after `pip install`.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED = ("configs", "ds_configs")


def resolve(path: str | Path) -> Path:
    """`path` if it exists (a user's own file always wins); else, for a relative `configs/...`
    or `ds_configs/...`, the package's copy when it has one; else `path` unchanged (and the
    caller's not-found message names it)."""
    p = Path(path)
    if p.exists() or p.is_absolute() or not p.parts or p.parts[0] not in SHIPPED:
        return p
    shipped = PACKAGE / p
    return shipped if shipped.exists() else p
