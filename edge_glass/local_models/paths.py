"""Find models in a built local model set, without importing torch or transformers.

Kept apart from `build.py` so configs and data code can resolve a local model directory (and
fail with a fix-it message) at the cost of reading one small JSON file.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_glass.utils.errors import UserError

INDEX_FILE = "index.json"
DEFAULT_DIR = Path("models/local")


def build_command(out_dir: str | Path) -> str:
    """The command that (re)builds the local model set in `out_dir`."""
    return f"python scripts/make_local_models.py --out {out_dir}"


def local_model_index(out_dir: str | Path = DEFAULT_DIR) -> dict[str, dict[str, str]]:
    """The parsed `index.json` of a local model set: name -> {path, kind, source, description}.

    Raises `UserError` naming the missing file and the command that builds it.
    """
    index_path = Path(out_dir) / INDEX_FILE
    try:
        text = index_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no local model set at {index_path}; build it with: {build_command(out_dir)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{index_path} is not valid JSON ({e}); rebuild it with: {build_command(out_dir)}") from None


def local_model_path(name: str, out_dir: str | Path = DEFAULT_DIR) -> Path:
    """The directory of model `name` in the local set, ready for `from_pretrained`/`SentenceTransformer`.

    Raises `UserError` if the set or the model is missing (e.g. built with `--no-real`).
    """
    index = local_model_index(out_dir)
    if name not in index:
        raise UserError(
            f"model {name!r} is not in {Path(out_dir) / INDEX_FILE} (it has: {', '.join(sorted(index)) or 'nothing'}); "
            f"build it with: {build_command(out_dir)}"
        )
    path = Path(out_dir) / index[name]["path"]
    if not path.is_dir():
        raise UserError(f"{path} is listed in the index but missing; rebuild it with: {build_command(out_dir)}")
    return path
