"""The raw datasets `scripts/download_datasets.py` can write, by name.

Each entry builds a `RawSource` (see `raw_shards.py`) from the command line's options, passed as
keyword arguments. Sources take different options (image_size means something only to the
synthetic generator, hf_path only to the real sets), so `build_source` passes each factory the
options its signature names and refuses an option the user set that the chosen source would
ignore: someone who types `--image_size 32 --dataset pixmo_cap` believes it does something.

    synthetic              offline tri-modal generator (image + audio + caption)       synthetic.py
    pixmo_cap              PixMo-Cap: web images + dense captions                      pixmo.py
    pixmo_qa               PixMo QA mix: images + QA pairs                             pixmo.py
    audiocaps              AudioCaps (or any Audio + caption table): clips + captions  audio_captions.py
    localized_narratives   Localized Narratives: image + spoken description + transcription  narratives.py
    webdataset             your own WebDataset tar shards (img2dataset output, ...)     webdataset_import.py
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable

from edge_glass.data.audio_captions import AudioCapsSource
from edge_glass.data.narratives import LocalizedNarrativesSource
from edge_glass.data.pixmo import PixmoCapSource, PixmoQASource
from edge_glass.data.raw_shards import RawSource
from edge_glass.data.synthetic import SyntheticSource
from edge_glass.data.webdataset_import import WebDatasetSource
from edge_glass.utils.errors import UserError

DATASETS: dict[str, Callable[..., RawSource]] = {
    "synthetic": SyntheticSource,
    "pixmo_cap": PixmoCapSource,
    "pixmo_qa": PixmoQASource,
    "audiocaps": AudioCapsSource,
    "localized_narratives": LocalizedNarrativesSource,
    "webdataset": WebDatasetSource,
}


def get_dataset(name: str) -> Callable[..., RawSource]:
    """The factory for dataset `name`; an unknown name lists the known ones and the nearest."""
    if name in DATASETS:
        return DATASETS[name]
    near = difflib.get_close_matches(name, DATASETS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise UserError(f"unknown dataset {name!r}{hint} (known: {', '.join(DATASETS)})")


def accepted_options(name: str) -> list[str]:
    """The keyword arguments the factory of dataset `name` takes."""
    return [p for p in inspect.signature(get_dataset(name)).parameters if p != "self"]


def build_source(
    name: str, options: dict[str, Any], given: Iterable[str] = (), flags: dict[str, str] | None = None
) -> RawSource:
    """Build dataset `name` from `options` (keyword -> value; None means "not set, use the source's
    default"). `flags` maps command-line flags to the keyword each feeds and `given` names the flags
    the user set: one whose keyword the source does not take is a `UserError` naming the flag."""
    factory = get_dataset(name)
    takes = set(accepted_options(name))
    flags = flags or {}
    ignored = [f for f in given if flags.get(f, f) not in takes]
    if ignored:
        usable = [f"--{f}" for f, kw in flags.items() if kw in takes]
        raise UserError(
            f"{', '.join('--' + f for f in ignored)} does not apply to --dataset {name} "
            f"(its options: {', '.join(usable) or 'none beyond the common ones'})"
        )
    return factory(**{k: v for k, v in options.items() if k in takes and v is not None})
