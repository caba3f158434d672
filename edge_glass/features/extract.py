"""The extraction driver: raw shards in, feature shards and a manifest out, resumably.

Raw shard i of a split becomes feature shard i. Under torchrun or the deepspeed launcher, rank r
takes shards r, r + W, r + 2W, ...; rank 0 writes the manifest after a barrier. Each shard is
written under a temporary name and renamed, then its record (`shard-NNNNNN.json`) is written
last, so a shard is complete exactly when its record exists: a re-run after kill -9 at any
moment skips complete shards, deletes stale temporaries and redoes the rest. Batches never span
two shards, so a redone shard is computed exactly as it would have been in one go.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from edge_glass import __version__
from edge_glass.config import Config
from edge_glass.data.raw_shards import iter_shard_samples, list_shards
from edge_glass.encoders.base import FrozenEncoder
from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.features.hdf5_shard import write_hdf5_shard
from edge_glass.features.manifest import (
    EXTRACTION,
    FORMAT_SUFFIX,
    FORMAT_VERSION,
    MANIFEST,
    differences,
    fingerprint,
    read_json,
    shard_stem,
    split_dir,
)
from edge_glass.features.stats import RunningMoments
from edge_glass.features.wds_shard import write_wds_shard
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path, sha256_file, write_text_atomic
from edge_glass.utils.prefetch import prefetch
from edge_glass.utils.progress import progress_bar

_NP_DTYPE = {"float16": np.float16, "float32": np.float32}


def config_splits(cfg: Config) -> list[str]:
    s = cfg.data.splits
    return [x for x in (s.train, s.val, s.test) if x is not None]


def extract_store(
    cfg: Config,
    encoders: dict[str, FrozenEncoder],
    formats: Sequence[str],
    batch_size: int | None = None,
    overwrite: bool = False,
    splits: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Extract every split of `cfg` into `cfg.data.features_dir`; returns split -> manifest path.

    Call on every rank when launched distributed (the process group must be initialised).
    """
    if not encoders:
        raise UserError("encoders: no encoder is configured, so there is nothing to extract")
    unknown = set(formats) - set(FORMAT_SUFFIX)
    if unknown or not formats:
        raise UserError(f"--format: expected webdataset, hdf5 or both, got {sorted(unknown) or 'nothing'}")
    described = {m: e.describe() for m, e in encoders.items()}
    settings = {
        "fingerprint": fingerprint(described, cfg.encoders.store_dtype),
        "format_version": FORMAT_VERSION,
        "store_dtype": cfg.encoders.store_dtype,
        "encoders": described,
    }
    batch = batch_size or cfg.encoders.batch_size
    manifests = {}
    for split in splits or config_splits(cfg):
        manifests[split] = _extract_split(cfg, split, encoders, settings, list(formats), batch, overwrite)
    return manifests


def _extract_split(
    cfg: Config,
    split: str,
    encoders: dict[str, FrozenEncoder],
    settings: dict,
    formats: list[str],
    batch_size: int,
    overwrite: bool,
) -> Path:
    raw_shards = list_shards(Path(cfg.data.raw_dir) / split)
    out = split_dir(cfg.data.features_dir, split)
    rank, world = D.rank(), D.world_size()
    _refuse_mismatch(out, settings, overwrite)
    if rank == 0:
        _prepare_split_dir(out, settings, overwrite)
    D.barrier()

    mine = [i for i in range(len(raw_shards)) if i % world == rank]
    todo = [i for i in mine if not _complete(out, i, formats)]
    counts = _raw_counts(raw_shards)
    total = sum(counts.get(i, 0) for i in todo) * world if counts else None  # rank 0's share, scaled
    skipped = len(mine) - len(todo)
    with progress_bar(f"extract {split}", total, enabled=rank == 0) as bar:
        for i in todo:
            _extract_shard(raw_shards[i], out, i, encoders, settings, formats, batch_size, cfg.encoders.store_dtype, bar, world)
    D.barrier()
    if rank == 0:
        _write_manifest(out, split, raw_shards, settings, cfg.data.raw_dir)
        if skipped:
            print(f"extract {split}: {skipped} shard(s) were already complete and kept")
    D.barrier()
    return out / MANIFEST


def _refuse_mismatch(out: Path, settings: dict, overwrite: bool) -> None:
    """Every rank checks (read-only), so a refusal stops all of them, not only rank 0."""
    record = out / EXTRACTION
    if record.is_file() and not overwrite:
        old = read_json(record)
        if old.get("fingerprint") != settings["fingerprint"]:
            changed = ", ".join(f"encoders.{d}" for d in differences(old.get("encoders"), settings["encoders"])) or "store settings"
            raise UserError(
                f"{out} holds features of other encoders or settings (store fingerprint {old.get('fingerprint')}, "
                f"this config {settings['fingerprint']}; differs in {changed}); re-run with --overwrite to replace them"
            )


def _prepare_split_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """Rank 0, before any rank writes: clear for --overwrite, drop stale temporaries, record settings."""
    record = out / EXTRACTION
    if out.is_dir():
        for p in out.iterdir():
            # Temporaries are left only by killed runs; nothing is writing while ranks wait at
            # the barrier after this. With --overwrite, remove only what extraction writes,
            # never a user's stray files.
            ours = p.name.startswith(("shard-", ".tmp-")) or p.name in (MANIFEST, EXTRACTION)
            if p.name.startswith(".tmp-") or (overwrite and ours):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not record.is_file() or overwrite:
        write_text_atomic(record, json.dumps(settings, indent=1, sort_keys=True))


def _complete(out: Path, index: int, formats: list[str]) -> bool:
    record = out / f"{shard_stem(index)}.json"
    if not record.is_file():
        return False
    have = read_json(record)["files"]
    return all(fmt in have and (out / have[fmt]["file"]).is_file() for fmt in formats)


def _raw_counts(raw_shards: list[Path]) -> dict[int, int]:
    """Per-shard sample counts from the raw split's index.json, when the source wrote one."""
    index = raw_shards[0].parent / "index.json"
    if not index.is_file():
        return {}
    data = read_json(index)
    by_name = {s["name"]: int(s["samples"]) for s in data.get("shards", [])}
    return {i: by_name[p.name] for i, p in enumerate(raw_shards) if p.name in by_name}


def _batched(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoder_inputs(modality: str, batch: list[dict], path: Path) -> list[Any]:
    field = {"vision": "image", "audio": "audio", "text": "caption"}[modality]
    missing = [s["key"] for s in batch if s.get(field) is None]
    if missing:
        raise UserError(f"{path}: sample {missing[0]!r} has no {field}, but encoders.{modality} is configured")
    if modality == "audio":
        return [(s["audio"], s["sample_rate"]) for s in batch]
    return [s[field] for s in batch]


def _extract_shard(
    raw_path: Path,
    out: Path,
    index: int,
    encoders: dict[str, FrozenEncoder],
    settings: dict,
    formats: list[str],
    batch_size: int,
    store_dtype: str,
    bar: Any,
    world: int,
) -> None:
    stem = shard_stem(index)
    np_dtype = _NP_DTYPE[store_dtype]
    keys: list[str] = []
    captions: list[str] = []
    meta: list[str] = []
    parts: dict[str, dict[str, list]] = {m: {"tokens": [], "lengths": [], "pooled": []} for m in encoders}
    moments: dict[str, RunningMoments] = {}

    def prepared(batches: Iterator[list[dict]]) -> Iterator[tuple[list[dict], dict]]:
        # CPU preprocessing for batch k+1 runs in the prefetch thread while batch k encodes.
        for b in batches:
            yield b, {m: e.prepare(_encoder_inputs(m, b, raw_path)) for m, e in encoders.items()}

    started = time.perf_counter()
    for samples, inputs in prefetch(prepared(_batched(iter_shard_samples(raw_path), batch_size)), depth=2):
        keys += [s["key"] for s in samples]
        captions += [s["caption"] for s in samples]
        meta += [json.dumps(s["json"], sort_keys=True) for s in samples]
        for m, enc in encoders.items():
            res = enc.encode(inputs[m])
            lengths = res.lengths.numpy()
            mask = torch.arange(res.tokens.shape[1])[None, :] < res.lengths[:, None]
            tokens = res.tokens[mask].numpy().astype(np_dtype)  # true-length rows, flat
            pooled = res.pooled.numpy().astype(np_dtype)
            parts[m]["tokens"].append(tokens)
            parts[m]["lengths"].append(lengths)
            parts[m]["pooled"].append(pooled)
            for field, rows in ((f"{m}.tokens", tokens), (f"{m}.pooled", pooled)):
                moments.setdefault(field, RunningMoments(rows.shape[1])).update(rows)
        bar.advance(len(samples) * world)
    if not keys:
        raise UserError(f"{raw_path}: raw shard holds no samples")

    modalities = {}
    for m, p in parts.items():
        lengths = np.concatenate(p["lengths"])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        modalities[m] = ModalityArrays(np.concatenate(p["tokens"]), offsets, np.concatenate(p["pooled"]))
    block = FeatureBlock(keys, captions, meta, modalities)

    files = {}
    for fmt in formats:
        final = out / f"{stem}{FORMAT_SUFFIX[fmt]}"
        with atomic_path(final) as tmp:
            if fmt == "hdf5":
                write_hdf5_shard(tmp, block, {"format_version": FORMAT_VERSION, "fingerprint": settings["fingerprint"]})
            else:
                write_wds_shard(tmp, block)
        files[fmt] = {"file": final.name, "sha256": sha256_file(final), "bytes": final.stat().st_size}
    old_record = out / f"{stem}.json"
    if old_record.is_file():
        prev = read_json(old_record)
        if prev.get("fingerprint") == settings["fingerprint"]:
            for fmt, entry in prev.get("files", {}).items():
                if fmt not in files and (out / entry["file"]).is_file():
                    files[fmt] = entry
    files = dict(sorted(files.items()))
    record = {
        "name": stem,
        "raw_shard": raw_path.name,
        "num_samples": len(keys),
        "fingerprint": settings["fingerprint"],
        "files": files,
        "fields": {
            f"{m}.{kind}": {"dim": int(a.tokens.shape[1] if kind == "tokens" else a.pooled.shape[1]), "max_length": int(a.lengths.max())}
            if kind == "tokens"
            else {"dim": int(a.pooled.shape[1])}
            for m, a in modalities.items()
            for kind in ("tokens", "pooled")
        },
        "moments": {k: v.to_json() for k, v in moments.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_text_atomic(out / f"{stem}.json", json.dumps(record, sort_keys=True))


def _write_manifest(out: Path, split: str, raw_shards: list[Path], settings: dict, raw_dir: str) -> None:
    records = []
    for i in range(len(raw_shards)):
        path = out / f"{shard_stem(i)}.json"
        if not path.is_file():
            raise UserError(f"{out}: shard {shard_stem(i)} is missing after extraction; re-run extraction to finish it")
        records.append(read_json(path))
    # Formats present in every shard are the store's formats.
    formats = sorted(set.intersection(*(set(r["files"]) for r in records)))
    moments: dict[str, RunningMoments] = {}
    for r in records:
        for field, m in r["moments"].items():
            if field in moments:
                moments[field].merge(RunningMoments.from_json(m))
            else:
                moments[field] = RunningMoments.from_json(m)
    fields = {}
    for field, spec in records[0]["fields"].items():
        entry = {"dim": spec["dim"], "dtype": settings["store_dtype"]}
        if "max_length" in spec:
            entry["max_length"] = max(r["fields"][field]["max_length"] for r in records)
        fields[field] = entry
    stats = {}
    for field, m in moments.items():
        mean, std = m.mean_std()
        stats[field] = {"count": m.count, "mean": mean.tolist(), "std": std.tolist()}
    manifest = {
        "format_version": FORMAT_VERSION,
        "edge_glass_version": __version__,
        "split": split,
        "fingerprint": settings["fingerprint"],
        "store_dtype": settings["store_dtype"],
        "encoders": settings["encoders"],
        "formats": formats,
        "fields": fields,
        "num_samples": sum(r["num_samples"] for r in records),
        "shards": [{k: r[k] for k in ("name", "raw_shard", "num_samples", "files")} for r in records],
        "source": {"raw_dir": str(raw_dir)},
        "stats": stats,
    }
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1))

