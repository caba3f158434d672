"""Convert an existing store to another token storage, without the encoders:

    python -m edge_glass.features convert data/features/pixmo data/features/pixmo-int8 --token_dtype int8

Every split of SRC is rewritten into DST shard by shard (resumable: complete shards are kept on
a re-run), with the codes taken after the z-score of SRC's `--stats_split` (its manifest's
per-dimension mean and std; every split shares it, as an extracted store's splits do). The
manifests keep SRC's encoders, so DST has SRC's encoder fingerprint: a model trained on either
reads the other. Tokens go through the same `store_rows` extraction uses, so converting an
extracted float16 store gives the bytes extracting straight to int8 with those statistics would.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_glass.features.block import FeatureBlock, ModalityArrays
from edge_glass.features.manifest import MANIFEST, encoder_fingerprint, manifest_encoder_fingerprint, read_json, store_settings
from edge_glass.features.quantize import FLOAT_DTYPE, QUANTIZED, TOKEN_DTYPES, store_rows, zscore_record
from edge_glass.features.shard_writer import write_shard_files
from edge_glass.features.split_records import prepare_split_dir, refuse_mismatch, shard_complete, write_manifest
from edge_glass.features.stats import RunningMoments, row_sums
from edge_glass.features.store import open_store
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic
from edge_glass.utils.locks import hold_collectively
from edge_glass.utils.progress import progress_bar

QUANTIZATION = "quantization.json"


def store_splits(store: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(store).glob(f"*/{MANIFEST}"))


def convert_store(src: str | Path, dst: str | Path, token_dtype: str, pooled_dtype: str | None = None,
                  formats: Sequence[str] | None = None, stats_split: str = "train", workers: int = 0,
                  overwrite: bool = False) -> dict[str, Path]:
    """Rewrite every split of `src` into `dst` with `token_dtype` tokens; split -> manifest."""
    src, dst = Path(src), Path(dst)
    if token_dtype not in TOKEN_DTYPES:
        raise UserError(f"--token_dtype: expected one of {', '.join(TOKEN_DTYPES)}, got {token_dtype!r}")
    splits = store_splits(src)
    if not splits:
        raise UserError(f"{src}: no split with a {MANIFEST} (not a feature store, or extraction did not finish)")
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the destination must differ from the source (the source is read while converting)")
    manifests = {s: read_json(src / s / MANIFEST) for s in splits}
    fingerprints = {manifest_encoder_fingerprint(m) for m in manifests.values()}
    if len(fingerprints) > 1:
        raise UserError(f"{src}: its splits were extracted with different encoders ({', '.join(sorted(fingerprints))})")
    first = manifests[splits[0]]
    encoders = first["encoders"]
    pooled_dtype = pooled_dtype or first.get("pooled_dtype") or first["store_dtype"]
    formats = list(formats or first["formats"])
    quantization = None
    if token_dtype in QUANTIZED:
        quantization = _quantization(src, dst, stats_split, manifests, encoders, overwrite)
    settings = store_settings(encoders, token_dtype, pooled_dtype, quantization)
    out = {}
    for split in splits:
        out[split] = _convert_split(src, dst, split, settings, formats, workers, overwrite)
    return out


def _quantization(src: Path, dst: Path, stats_split: str, manifests: dict, encoders: dict, overwrite: bool) -> dict:
    if stats_split not in manifests:
        raise UserError(f"--stats_split: {src} has no split {stats_split!r} (it has {', '.join(manifests)})")
    stats = manifests[stats_split]["stats"]
    modalities = sorted({f.split(".")[0] for f in manifests[stats_split]["fields"]})
    record = {
        "encoder_fingerprint": encoder_fingerprint(encoders),
        "calibration": f"statistics of {src / stats_split}",
        "modalities": {m: zscore_record(stats[f"{m}.tokens"]["mean"], stats[f"{m}.tokens"]["std"]) for m in modalities},
    }
    path = dst / QUANTIZATION
    if path.is_file() and not overwrite and read_json(path) != record:
        raise UserError(f"{path}: {dst} was converted with other statistics; re-run with --overwrite to replace it")
    dst.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=1))
    return record["modalities"]


def _convert_split(src: Path, dst: Path, split: str, settings: dict, formats: list[str], workers: int,
                   overwrite: bool) -> Path:
    source = open_store(src, split)
    for fmt in formats:
        if fmt not in ("hdf5", "webdataset"):
            raise UserError(f"--format: expected hdf5, webdataset or both, got {fmt!r}")
    out = dst / split
    with hold_collectively(out, "store conversion"):
        return _convert_locked_split(src, split, source, out, settings, formats, workers, overwrite)


def _convert_locked_split(src: Path, split: str, source, out: Path, settings: dict, formats: list[str], workers: int,
                          overwrite: bool) -> Path:
    refuse_mismatch(out, settings, overwrite)
    prepare_split_dir(out, settings, overwrite)
    n = len(source.shards)
    todo = [i for i in range(n) if not shard_complete(out, i, formats)]
    sizes = source.shard_sizes
    raw = [s.get("raw_shard") or "" for s in read_json(src / split / MANIFEST)["shards"]]
    with progress_bar(f"convert {split}", int(sum(sizes[i] for i in todo))) as bar:
        if workers > 0 and len(todo) > 1:
            with ProcessPoolExecutor(workers) as pool:
                jobs = [pool.submit(convert_shard, src, split, i, raw[i], out, settings, formats) for i in todo]
                for i, job in zip(todo, jobs):
                    job.result()
                    bar.advance(int(sizes[i]))
        else:
            for i in todo:
                convert_shard(src, split, i, raw[i], out, settings, formats, source)
                bar.advance(int(sizes[i]))
    write_manifest(out, split, n, settings, {**source.manifest.get("source", {}), "converted_from": str(src / split)})
    return out / MANIFEST


def convert_shard(src: Path, split: str, index: int, raw_shard: str, out: Path, settings: dict, formats: list[str],
                  source=None) -> None:
    """Shard `index` of `src`/`split` rewritten into `out` under `settings` (`raw_shard`: the raw
    shard it was extracted from, kept in its record)."""
    started = time.perf_counter()
    source = source or open_store(src, split)
    shard = source.shards[index]
    block = source.read(int(source.shard_starts[index]), int(source.shard_starts[index + 1]))  # float tokens
    quantization = settings.get("quantization")
    modalities, moments, dims = {}, {}, {}
    for m, a in block.modalities.items():
        zscore = None
        if quantization is not None:
            q = quantization[m]
            zscore = (torch.tensor(q["center"]), torch.tensor(q["spread"]))
        tokens, scales, reference = store_rows(torch.from_numpy(np.ascontiguousarray(a.tokens)), settings["token_dtype"], zscore)
        pooled = torch.from_numpy(np.ascontiguousarray(a.pooled)).to(FLOAT_DTYPE[settings["pooled_dtype"]])
        modalities[m] = ModalityArrays(tokens.numpy(), a.offsets, pooled.numpy(), None if scales is None else scales.numpy())
        for field, rows in ((f"{m}.tokens", reference), (f"{m}.pooled", pooled)):
            sums = row_sums(rows).numpy()
            moments[field] = RunningMoments(sums.shape[1])
            moments[field].add(int(sums[0, 0]), sums[1], sums[2])
        dims[m] = int(a.tokens.shape[1])
    write_shard_files(out, index, Path(raw_shard or shard.path.name),
                      FeatureBlock(block.keys, block.captions, block.meta, modalities), moments, dims, formats, settings,
                      time.perf_counter() - started)
