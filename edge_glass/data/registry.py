"""The raw datasets `scripts/download_datasets.py` can write, by name.

Each entry builds a `RawSource` (see `raw_shards.py`) from the command line's generation options
as keyword arguments (num_samples, seed, fractions, image_size, holdout). Real sources
(pixmo_cap, pixmo_qa, an audio-caption set) register here beside `synthetic`.
"""

from __future__ import annotations

import difflib
from typing import Callable

from edge_glass.data.raw_shards import RawSource
from edge_glass.data.synthetic import SyntheticSource
from edge_glass.utils.errors import UserError

DATASETS: dict[str, Callable[..., RawSource]] = {
    "synthetic": SyntheticSource,
}


def get_dataset(name: str) -> Callable[..., RawSource]:
    """The factory for dataset `name`; an unknown name lists the known ones and the nearest."""
    if name in DATASETS:
        return DATASETS[name]
    near = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise UserError(f"unknown dataset {name!r}{hint} (known: {', '.join(sorted(DATASETS))})")
