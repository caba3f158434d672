"""Check every shard of a store against its manifest: presence, size, sha256, sample count."""

from __future__ import annotations

from pathlib import Path

from edge_glass.config import plain_name
from edge_glass.features.integrity import check_file
from edge_glass.features.manifest import MANIFEST, read_json
from edge_glass.features.store import _SHARD_CLASS


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
                if not plain_name(entry["file"]):
                    problems.append(f"{manifest_path}: shard file {entry['file']!r} is not a plain file name")
                    continue
                path = split / entry["file"]
                found = check_file(path, entry["bytes"], entry["sha256"])
                if found:
                    problems.append(found)
                    continue
                count = len(_SHARD_CLASS[fmt](path))
                if count != shard["num_samples"]:
                    problems.append(f"{path}: {count} samples, manifest says {shard['num_samples']}")
    return problems
