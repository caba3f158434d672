"""The extraction driver: raw shards in, feature shards and a manifest out, resumably.

Raw shard i of a split becomes feature shard i. Under torchrun or the deepspeed launcher, rank r
takes shards r, r + W, r + 2W, ...; rank 0 writes the manifest after a barrier. Each shard is
written under a temporary name and renamed, then its record (`shard-NNNNNN.json`) is written
last, so a shard is complete exactly when its record exists: a re-run after kill -9 at any
moment skips complete shards, deletes stale temporaries and redoes the rest. Batches never span
two shards, so a redone shard is computed exactly as it would have been in one go.

The pipeline, per rank, keeps the encoders busy:

    worker processes         extracting thread (device)                  writer thread
    read, decode,     ->     encode, cut padding, convert or quantise,  -> collect the shard,
    preprocess               per-dimension sums; one async copy of what     write, hash, record
    (prepared_batches.py)    is stored to page-locked host memory           (shard_writer.py)

Only what is stored crosses to the host, in its stored dtype (float16, or int8/int4 codes and
their scales): a fraction of the float32 hidden states the first version copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from edge_glass.config import Config
from edge_glass.data.raw_shards import list_shards
from edge_glass.encoders.base import FrozenEncoder
from edge_glass.features.manifest import FORMAT_SUFFIX, MANIFEST, encoder_fingerprint, read_json, split_dir, store_settings
from edge_glass.features.prepared_batches import default_num_workers, prepared_batches
from edge_glass.features.sample_checks import nonfinite_samples
from edge_glass.features.quantize import FLOAT_DTYPE, QUANTIZED, store_rows, zscore_record
from edge_glass.features.shard_writer import ShardWriter, StoredBatch
from edge_glass.features.split_records import prepare_split_dir, refuse_mismatch, shard_complete, write_manifest
from edge_glass.features.stats import RunningMoments, row_sums
from edge_glass.utils import distributed as D
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic
from edge_glass.utils.locks import hold_collectively
from edge_glass.utils.progress import progress_bar

QUANTIZATION = "quantization.json"
"""Store-level record of the z-score int8/int4 codes are taken after (every split shares it)."""


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
    num_workers: int | None = None,
) -> dict[str, Path]:
    """Extract every split of `cfg` into `cfg.data.features_dir`; returns split -> manifest path.

    Call on every rank when launched distributed (the process group must be initialised).
    `num_workers` (preprocessing processes) defaults to `encoders.num_workers` of the config."""
    if not encoders:
        raise UserError("encoders: no encoder is configured, so there is nothing to extract")
    unknown = set(formats) - set(FORMAT_SUFFIX)
    if unknown or not formats:
        raise UserError(f"--format: expected webdataset, hdf5 or both, got {sorted(unknown) or 'nothing'}")
    described = {m: e.describe() for m, e in encoders.items()}
    batch = batch_size or cfg.encoders.batch_size
    quantization = None
    if cfg.features.token_dtype in QUANTIZED:
        quantization = _quantization(cfg, encoders, described, batch, overwrite)
    settings = store_settings(described, cfg.features.token_dtype, cfg.features.pooled_dtype, quantization)
    workers = num_workers if num_workers is not None else cfg.encoders.num_workers
    workers = default_num_workers() if workers is None else workers
    manifests = {}
    for split in splits or config_splits(cfg):
        manifests[split] = _extract_split(cfg, split, encoders, settings, list(formats), batch, overwrite, workers)
    return manifests


# --- what is stored, computed on the encoders' device ---------------------------------------------


def flat_rows(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, D] padded tokens -> [sum of lengths, D] true-length rows, sample after sample.
    The row index is built on the host from the host lengths: no wait for the device."""
    b, t, d = tokens.shape
    if bool((lengths == t).all()):
        return tokens.reshape(b * t, d)
    keep = (torch.arange(t)[None, :] < lengths[:, None]).reshape(-1)
    index = torch.nonzero(keep).squeeze(1).to(tokens.device, non_blocking=True)
    return tokens.reshape(b * t, d).index_select(0, index)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued (page-locked destination); host tensors as they are."""
    if t.device.type == "cpu":
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def zscore_tensors(quantization: dict | None, device: torch.device) -> dict | None:
    """The manifest's quantisation statistics as tensors on `device`, once per split."""
    if quantization is None:
        return None
    return {m: (torch.tensor(q["center"], dtype=torch.float32, device=device),
                torch.tensor(q["spread"], dtype=torch.float32, device=device)) for m, q in quantization.items()}


def encode_batch(item: dict, encoders: dict[str, FrozenEncoder], token_dtype: str, pooled_dtype: str,
                 zscore: dict | None) -> StoredBatch:
    """A prepared batch through every encoder; what is stored, on its way to the host.

    Per modality, on the device: padding cut, tokens converted or quantised (store_rows), and
    the per-dimension sums of the stored values (of the float16 values a quantised store codes,
    so its statistics equal those of the float16 store of the same features), over the samples
    whose outputs are finite in every modality. The per-sample `bad` flags travel with the batch;
    the writer refuses or leaves out those samples (encoders.on_bad_sample)."""
    results = {m: enc.encode(item["inputs"][m]) for m, enc in encoders.items()}
    rows = {m: flat_rows(res.tokens, res.lengths) for m, res in results.items()}
    bad = sum(nonfinite_samples(rows[m], res.lengths, res.pooled) for m, res in results.items()) > 0
    tokens, lengths, scales, pooled, sums, dims = {}, {}, {}, {}, {}, {}
    device = None
    for m, res in results.items():
        device = res.tokens.device
        stored, row_scales, reference = store_rows(rows[m], token_dtype, zscore[m] if zscore else None)
        vectors = res.pooled.to(FLOAT_DTYPE[pooled_dtype])
        keep_rows = torch.repeat_interleave(~bad, res.lengths.to(bad.device), output_size=int(res.lengths.sum()))
        sums[f"{m}.tokens"] = _to_host(row_sums(reference, keep_rows))
        sums[f"{m}.pooled"] = _to_host(row_sums(vectors, ~bad))
        tokens[m] = _to_host(stored)
        scales[m] = None if row_scales is None else _to_host(row_scales)
        pooled[m] = _to_host(vectors)
        lengths[m] = res.lengths.numpy()
        dims[m] = int(res.tokens.shape[2])
    ready = None
    if device is not None and device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return StoredBatch(item["keys"], item["captions"], item["meta"], tokens, lengths, scales, pooled, sums, dims,
                       bad=_to_host(bad), ready=ready)


# --- quantisation statistics ----------------------------------------------------------------------


def _quantization(cfg: Config, encoders: dict[str, FrozenEncoder], described: dict, batch_size: int,
                  overwrite: bool) -> dict:
    """The store's per-modality (center, spread) for int8/int4 codes: read from the store, or
    (rank 0) computed from the first `features.calibration_samples` of the train split."""
    path = Path(cfg.data.features_dir) / QUANTIZATION
    fp = encoder_fingerprint(described)
    if D.rank() == 0:
        existing = read_json(path) if path.is_file() and not overwrite else None
        if existing is not None and existing.get("encoder_fingerprint") != fp:
            raise UserError(
                f"{path}: the store's int8/int4 codes were calibrated on features of other encoders (encoder "
                f"fingerprint {existing.get('encoder_fingerprint')}, this config {fp}); re-run with --overwrite"
            )
        if existing is None:
            stats = calibrate(cfg, encoders, batch_size)
            record = {"encoder_fingerprint": fp, "calibration": f"first {cfg.features.calibration_samples} samples of "
                      f"{cfg.data.splits.train}", "modalities": stats}
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(record, indent=1))
    D.barrier()
    return read_json(path)["modalities"]


def calibrate(cfg: Config, encoders: dict[str, FrozenEncoder], batch_size: int) -> dict:
    """Per-dimension mean and floored std of the token rows of the train split's first samples."""
    want = cfg.features.calibration_samples
    raw_dir = Path(cfg.data.raw_dir) / cfg.data.splits.train
    moments: dict[str, RunningMoments] = {}
    seen = 0
    shards = [(i, p) for i, p in enumerate(list_shards(raw_dir))]
    # Bad samples are left out here whatever encoders.on_bad_sample says (extraction itself then
    # refuses or skips them), and so are non-finite rows: statistics over finite values only.
    for item in prepared_batches(shards, batch_size, encoders, num_workers=0, on_bad_sample="skip"):
        if not item["keys"]:
            continue
        for m, enc in encoders.items():
            res = enc.encode(item["inputs"][m])
            rows = flat_rows(res.tokens, res.lengths).to(torch.float16)
            sums = row_sums(rows, torch.isfinite(rows).all(dim=1)).cpu().numpy()
            moments.setdefault(m, RunningMoments(sums.shape[1])).add(int(sums[0, 0]), sums[1], sums[2])
        seen += len(item["keys"])
        if seen >= want:
            break
    return {m: zscore_record(*mom.mean_std()) for m, mom in moments.items()}


# --- splits and shards ----------------------------------------------------------------------------


def _extract_split(cfg: Config, split: str, encoders: dict[str, FrozenEncoder], settings: dict, formats: list[str],
                   batch_size: int, overwrite: bool, num_workers: int) -> Path:
    raw_shards = list_shards(Path(cfg.data.raw_dir) / split)
    out = split_dir(cfg.data.features_dir, split)
    # One extraction per split at a time: a second one would delete this one's temporaries.
    with hold_collectively(out, "extraction"):
        return _extract_locked_split(cfg, split, raw_shards, out, encoders, settings, formats, batch_size, overwrite,
                                     num_workers)


def _extract_locked_split(cfg: Config, split: str, raw_shards: list[Path], out: Path, encoders: dict[str, FrozenEncoder],
                          settings: dict, formats: list[str], batch_size: int, overwrite: bool, num_workers: int) -> Path:
    rank, world = D.rank(), D.world_size()
    refuse_mismatch(out, settings, overwrite)
    if rank == 0:
        prepare_split_dir(out, settings, overwrite)
    D.barrier()

    mine = [i for i in range(len(raw_shards)) if i % world == rank]
    todo = [i for i in mine if not shard_complete(out, i, formats)]
    counts = _raw_counts(raw_shards)
    total = sum(counts.get(i, 0) for i in todo) * world if counts else None  # rank 0's share, scaled
    skipped = len(mine) - len(todo)
    device = next(iter(encoders.values())).device
    on_bad = cfg.encoders.on_bad_sample
    items = prepared_batches([(i, raw_shards[i]) for i in todo], batch_size, encoders, num_workers,
                             pin_memory=device.type == "cuda", on_bad_sample=on_bad)
    zscore = zscore_tensors(settings.get("quantization"), device)
    writer = ShardWriter(out, formats, settings, on_bad)
    expected = iter(todo)
    current = None
    try:
        with progress_bar(f"extract {split}", total, enabled=rank == 0) as bar:
            for item in items:
                if item["shard"] != current:
                    if current is not None:
                        writer.end()
                    current = _next_shard(expected, item["shard"], raw_shards)
                    writer.begin(current, raw_shards[current])
                stored = (encode_batch(item, encoders, settings["token_dtype"], settings["pooled_dtype"], zscore)
                          if item["keys"] else None)
                writer.add(stored, item["skipped"])
                bar.advance((len(item["keys"]) + sum(item["skipped"].values())) * world)
            if current is not None:
                writer.end()
            leftover = next(expected, None)
            if leftover is not None:
                raise UserError(f"{raw_shards[leftover]}: raw shard holds no samples")
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    D.barrier()
    if rank == 0:
        manifest = write_manifest(out, split, len(raw_shards), settings, {"raw_dir": str(cfg.data.raw_dir)})
        if skipped:
            print(f"extract {split}: {skipped} shard(s) were already complete and kept")
        if manifest.get("skipped"):
            left_out = manifest["skipped"]
            print(f"extract {split}: left out {sum(left_out.values())} bad sample(s) "
                  f"({', '.join(f'{k}: {v}' for k, v in left_out.items())}; encoders.on_bad_sample: skip)")
    D.barrier()
    return out / MANIFEST


def _next_shard(expected, shard: int, raw_shards: list[Path]) -> int:
    """The next shard of the rank's list; a shard skipped over had no samples."""
    nxt = next(expected, None)
    if nxt is not None and nxt != shard:
        raise UserError(f"{raw_shards[nxt]}: raw shard holds no samples")
    return shard


def _raw_counts(raw_shards: list[Path]) -> dict[int, int]:
    """Per-shard sample counts from the raw split's index.json, when the source wrote one."""
    index = raw_shards[0].parent / "index.json"
    if not index.is_file():
        return {}
    data = read_json(index)
    by_name = {s["name"]: int(s["samples"]) for s in data.get("shards", [])}
    return {i: by_name[p.name] for i, p in enumerate(raw_shards) if p.name in by_name}
