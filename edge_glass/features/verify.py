"""Check every shard of a store against its manifest: presence, size, sha256, sample count."""

from __future__ import annotations

from pathlib import Path

from edge_glass.features.manifest import MANIFEST, read_json
from edge_glass.features.store import _SHARD_CLASS
from edge_glass.utils.io import sha256_file


def verify_store(store: str | Path) -> list[str]:
    """Problems found, one line each (empty: the store is intact)."""
    store = Path(store)
    manifests = sorted(store.glob(f"*/{MANIFEST}"))
    if not manifests:
        return [f"{store}: no split with a {MANIFEST} (not a feature store, or extraction did not finish)"]
    problems = []
    for manifest_path in manifests:
        manifest = read_json(manifest_path)
        split = manifest_path.parent
        for shard in manifest["shards"]:
            for fmt, entry in shard["files"].items():
                path = split / entry["file"]
                if not path.is_file():
                    problems.append(f"{path}: missing")
                    continue
                if path.stat().st_size != entry["bytes"]:
                    problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
                    continue
                if sha256_file(path) != entry["sha256"]:
                    problems.append(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
                    continue
                count = len(_SHARD_CLASS[fmt](path))
                if count != shard["num_samples"]:
                    problems.append(f"{path}: {count} samples, manifest says {shard['num_samples']}")
    return problems
