"""The feature store's contract: file layout, the manifest, and store fingerprints.

    <store>/<split>/shard-NNNNNN.h5 | .tar     raw shard i becomes feature shard i
    <store>/<split>/shard-NNNNNN.json          per-shard record, written last: its presence
                                               marks the shard complete
    <store>/<split>/extraction.json            encoders and settings the split is made with
    <store>/<split>/manifest.json              written last, by rank 0, when every shard is done

Two fingerprints. The *encoder* fingerprint hashes what the frozen encoders compute (ids, weight
hashes, layers, preprocessing, spatial pooling): two stores with the same encoder fingerprint
hold the same features, whatever their storage, so a model trained on one may read the other.
The *store* fingerprint adds how the values are stored (token and pooled dtypes, quantisation
statistics, format version): an exact resume needs the same store fingerprint, because the
bytes the model reads must not change under it.

Format versions: 1 stored every field as `store_dtype` (float16/float32); 2 adds `token_dtype`,
`pooled_dtype` and, for int8/int4 tokens, `quantization` (see quantize.py). Version 1 stores
are read as float stores of version 2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edge_glass.utils.errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
EXTRACTION = "extraction.json"
FORMAT_SUFFIX = {"hdf5": ".h5", "webdataset": ".tar"}
EXTRACT_HINT = "python scripts/extract_features.py --config <your config>"


def shard_stem(index: int) -> str:
    return f"shard-{index:06d}"


def split_dir(store: str | Path, split: str) -> Path:
    return Path(store) / split


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encoder_fingerprint(encoders: dict[str, Any]) -> str:
    """Short stable hash of what the encoders compute (the manifest's `encoders` section)."""
    return _digest({"encoders": encoders})


def fingerprint(encoders: dict[str, Any], storage: dict[str, Any]) -> str:
    """Short stable hash of everything that determines the stored bytes' values."""
    return _digest({"format_version": FORMAT_VERSION, "encoders": encoders, "storage": storage})


def store_settings(encoders: dict[str, Any], token_dtype: str, pooled_dtype: str, quantization: dict | None) -> dict:
    """A split's `extraction.json`: the encoders, how their values are stored, both fingerprints.
    Extraction and the store converter write splits under it (and refuse a split made otherwise)."""
    storage = {"token_dtype": token_dtype, "pooled_dtype": pooled_dtype, "quantization": quantization}
    settings = {
        "fingerprint": fingerprint(encoders, storage),
        "encoder_fingerprint": encoder_fingerprint(encoders),
        "format_version": FORMAT_VERSION,
        "token_dtype": token_dtype,
        "pooled_dtype": pooled_dtype,
        "encoders": encoders,
    }
    if quantization is not None:
        settings["quantization"] = quantization
    return settings


def token_dtype(manifest: dict) -> str:
    """How the split stores token sequences (float16, float32, int8 or int4)."""
    return manifest.get("token_dtype") or manifest["store_dtype"]


def pooled_dtype(manifest: dict) -> str:
    return manifest.get("pooled_dtype") or manifest["store_dtype"]


def manifest_encoder_fingerprint(manifest: dict) -> str:
    """The split's encoder fingerprint (version-1 manifests did not record it: computed)."""
    return manifest.get("encoder_fingerprint") or encoder_fingerprint(manifest["encoders"])


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
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise UserError(
            f"{path}: store format {manifest.get('format_version')} is not one this version reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}); re-extract with: {EXTRACT_HINT} --overwrite"
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
