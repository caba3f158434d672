"""The feature store's contract: file layout, the manifest, and store fingerprints.

    <store>/<split>/shard-NNNNNN.h5 | .tar     raw shard i becomes feature shard i
    <store>/<split>/shard-NNNNNN.json          per-shard record, written last: its presence
                                               marks the shard complete
    <store>/<split>/extraction.json            encoders and settings the split is made with
    <store>/<split>/manifest.json              written last, by rank 0, when every shard is done

The fingerprint hashes everything that changes feature values (encoder ids, weight hashes,
layers, preprocessing, store dtype, format version); training refuses a store whose
fingerprint or fields differ from what its config asks for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edge_glass.utils.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXTRACTION = "extraction.json"
FORMAT_SUFFIX = {"hdf5": ".h5", "webdataset": ".tar"}
EXTRACT_HINT = "python scripts/extract_features.py --config <your config>"


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def split_dir(store: str | Path, split: str) -> Path:
    return Path(store) / split


def fingerprint(encoders: dict[str, Any], store_dtype: str) -> str:
    """Short stable hash of what determines the stored values."""
    canonical = json.dumps(
        {"format_version": FORMAT_VERSION, "encoders": encoders, "store_dtype": store_dtype},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run extraction with --overwrite") from None


def load_manifest(store: str | Path, split: str) -> dict:
    """The split's manifest; a missing store names the path and the command that makes it."""
    path = split_dir(store, split) / MANIFEST
    if not path.is_file():
        partial = path.parent.is_dir() and any(path.parent.glob("shard-*.json"))
        state = "is incomplete (extraction did not finish)" if partial else "does not exist"
        raise UserError(f"feature store {path.parent} {state}; make it with: {EXTRACT_HINT}")
    manifest = read_json(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: store format {manifest.get('format_version')} is not the supported {FORMAT_VERSION}; "
            f"re-extract with: {EXTRACT_HINT} --overwrite"
        )
    return manifest


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                out.append(sub)
            else:
                out.extend(differences(old[key], new[key], sub))
        return out
    return [] if old == new else [path or "<root>"]
