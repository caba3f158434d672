"""Is a store's file what its manifest says? Sizes always, sha256 on request.

Training checks every shard of its splits before step 1 (`data.verify`): a truncated or replaced
shard is otherwise found only when the loader first opens it, possibly hours in, and a flipped
byte is never found (it reads as a plausible wrong value). `size` costs a stat per shard;
`sha256` reads every byte, split across the ranks and threads, with a progress bar.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_glass.features.manifest import MANIFEST, read_json
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import AgreedError
from edge_glass.utils.io import sha256_file
from edge_glass.utils.progress import progress_bar

FIX = "re-run extraction with --overwrite (or restore the file from where you copied the store)"


def check_file(path: Path, size: int | None, sha256: str | None = None) -> str | None:
    """One line saying what is wrong with `path`, or None when it matches."""
    if not path.is_file():
        return f"{path}: missing"
    have = path.stat().st_size
    if size is not None and size >= 0 and have != size:
        return f"{path}: {have} bytes, manifest says {size}"
    if sha256 and sha256_file(path) != sha256:
        return f"{path}: sha256 differs from the manifest (corrupt or replaced)"
    return None


def verify_split_files(split, mode: str, rank: int = 0, world: int = 1, threads: int = 8) -> None:
    """Every shard file of `split` against its manifest; the ranks share the work and agree."""
    files = [(split.path / name, int(size)) for name, size in zip(split.shard_files, split.shard_bytes)]
    hashes: list[str | None] = [None] * len(files)
    if mode == "sha256":
        shards = read_json(split.path / MANIFEST)["shards"]
        hashes = [s["files"][split.backend].get("sha256") or None for s in shards]
    mine = [i for i in range(len(files)) if i % world == rank]
    problems: list[str] = []
    if mode == "sha256":
        with progress_bar(f"verify {split.split} (sha256)", len(files), unit="shards", enabled=rank == 0) as bar, \
                ThreadPoolExecutor(threads) as pool:
            for found in pool.map(lambda i: check_file(*files[i], hashes[i]), mine):
                bar.advance(world)
                if found:
                    problems.append(found)
    else:
        problems = [p for p in (check_file(*files[i]) for i in mine) if p]
    everyone = D.all_gather_objects(problems)
    found = [p for ps in everyone for p in ps]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise AgreedError(f"{found[0]}{more}; {FIX}")
