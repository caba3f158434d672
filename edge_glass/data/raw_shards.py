"""Raw WebDataset shards: the one on-disk form every raw source is written in (DESIGN.md step 1).

    <out>/dataset.json               source, generation and writer parameters, split sizes
    <out>/<split>/shard-NNNNNN.tar   per sample: <key>.png, <key>.flac|wav, <key>.txt, <key>.json
    <out>/<split>/index.json         shard names, per-shard sample counts and bytes, total;
                                     written last, so it also marks the split complete

A shard is written under a temporary name and renamed when complete, so a reader never sees half
a shard and an interrupted run resumes by skipping every shard whose final file exists. That is
only sound if the existing shards came from the same parameters, so `dataset.json` is written
before the first shard and a re-run with other parameters is refused. Tar members carry mtime 0
and fixed owners, so the same samples give byte-identical shards. One writer per directory.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, TypedDict

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image

from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path, write_text_atomic

AUDIO_FORMATS = ("flac", "wav")
DATASET_FILE = "dataset.json"
INDEX_FILE = "index.json"
SHARD_GLOB = "shard-*.tar"
CREATE_HINT = "python scripts/download_datasets.py --dataset synthetic --num_samples N --out {out}"


class RawSample(TypedDict):
    """One decoded sample, as sources produce it and `iter_raw_samples` gives it back."""

    key: str
    image: Image.Image
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    caption: str
    json: dict


class RawSource(Protocol):
    """What a raw source gives the writer; sample i of a split must not depend on which shards ran."""

    name: str

    def params(self) -> dict:
        """Generation parameters: stored in dataset.json and compared on re-runs."""

    def split_sizes(self) -> dict[str, int]: ...

    def samples(self, split: str, start: int, stop: int) -> Iterator[RawSample]: ...


# ---------------------------------------------------------------------------------------------
# Encoding and one shard


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_sample(sample: RawSample, audio_format: str = "flac") -> dict[str, str | bytes]:
    """The tar members of one sample: png, 16-bit PCM flac|wav, utf-8 txt, json."""
    key = sample["key"]
    if not key or "." in key or "/" in key:
        # webdataset groups members by the text before the first dot; a dot in the key splits a sample
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    png = io.BytesIO()
    sample["image"].save(png, format="PNG")
    sound = io.BytesIO()
    sf.write(sound, sample["audio"], sample["sample_rate"], format=audio_format.upper(), subtype="PCM_16")
    return {
        "__key__": key,
        "png": png.getvalue(),
        audio_format: sound.getvalue(),
        "txt": sample["caption"].encode("utf-8"),
        "json": json.dumps(sample["json"], sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def write_shard(path: Path, samples: Iterable[RawSample], audio_format: str = "flac") -> int:
    """Write one shard atomically (temporary name, then rename); returns its size in bytes."""
    seen: set[str] = set()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0, encoder=False) as writer:
            for sample in samples:
                if sample["key"] in seen:
                    raise ValueError(f"duplicate sample key {sample['key']!r} in {path}")
                seen.add(sample["key"])
                writer.write(encode_sample(sample, audio_format))
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# A whole dataset: plan (validate, resume), then write


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    start: int
    stop: int
    path: Path

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass
class ShardPlan:
    """What `write_shards` will do; made by `prepare_raw_dataset`, so a caller can size a progress bar."""

    out: Path
    source: RawSource
    audio_format: str
    jobs: list[ShardJob]  # every shard, in order
    pending: list[ShardJob]  # the shards not on disk yet
    removed_tmp: int = 0  # leftovers of an interrupted run

    @property
    def skipped(self) -> int:
        return len(self.jobs) - len(self.pending)

    @property
    def pending_samples(self) -> int:
        return sum(j.samples for j in self.pending)


@dataclass(frozen=True)
class SplitSummary:
    split: str
    samples: int
    shards: int
    bytes: int
    written: int  # shards written by this run
    skipped: int  # shards already complete


@dataclass(frozen=True)
class _Description:
    source: str
    params: dict
    splits: dict[str, int]

    def to_json(self) -> dict:
        return {"format": 1, "source": self.source, "params": self.params, "splits": self.splits}


def _describe(source: RawSource, shard_size: int, audio_format: str) -> _Description:
    # shard_size and audio_format change the bytes on disk too, so a resume must match them as well
    params = {**source.params(), "shard_size": shard_size, "audio_format": audio_format}
    return _Description(source.name, json.loads(json.dumps(params)), source.split_sizes())


def _leftovers(split_dir: Path) -> list[Path]:
    # atomic_path's temporaries: '.tmp-<final name>.<random>'
    return sorted(split_dir.glob(".tmp-*")) if split_dir.is_dir() else []


def _check_existing(out: Path, wanted: _Description) -> None:
    """Refuse to resume into a directory made with other parameters (two datasets would mix)."""
    desc_path = out / DATASET_FILE
    if not desc_path.exists():
        stray = [d for d in (out / s for s in wanted.splits) if d.is_dir() and any(d.glob(SHARD_GLOB))]
        if stray:
            raise UserError(
                f"{stray[0]} holds shards but {desc_path} is missing, so their parameters are unknown; "
                f"pass --overwrite to regenerate, or choose another --out"
            )
        return
    try:
        have = json.loads(desc_path.read_text(encoding="utf-8"))
        have_source, have_params = have["source"], have["params"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{desc_path} is not a valid dataset description ({e}); pass --overwrite to regenerate") from e
    if have_source != wanted.source:
        raise UserError(
            f"{out} holds the {have_source!r} dataset, not {wanted.source!r}; pass --overwrite or choose another --out"
        )
    diffs = [
        f"{k}={have_params.get(k)!r} there, {v!r} now"
        for k, v in wanted.params.items()
        if have_params.get(k) != v
    ]
    diffs += [f"{k}={have_params[k]!r} there, unset now" for k in have_params if k not in wanted.params]
    if diffs:
        raise UserError(
            f"{out} was generated with other parameters ({'; '.join(diffs)}); "
            f"pass --overwrite to regenerate it, or choose another --out"
        )


def _remove_owned(out: Path, splits: Iterable[str]) -> None:
    """Delete only what this module writes, never the user's other files."""
    for d in (out / s for s in splits):
        if d.is_dir():
            for p in [*d.glob(SHARD_GLOB), d / INDEX_FILE, *_leftovers(d)]:
                p.unlink(missing_ok=True)
    (out / DATASET_FILE).unlink(missing_ok=True)


def prepare_raw_dataset(
    out: str | os.PathLike,
    source: RawSource,
    *,
    shard_size: int = 1000,
    audio_format: str = "flac",
    overwrite: bool = False,
) -> ShardPlan:
    """Validate `out` against `source`, record the parameters, and list the shards still to write."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"--shard_size must be a positive integer, got {shard_size!r}")
    if audio_format not in AUDIO_FORMATS:
        raise UserError(f"--audio_format must be one of {', '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    wanted = _describe(source, shard_size, audio_format)
    if overwrite:
        _remove_owned(out, wanted.splits)
    else:
        _check_existing(out, wanted)
    write_text_atomic(out / DATASET_FILE, json.dumps(wanted.to_json(), indent=2) + "\n")

    removed = 0
    jobs: list[ShardJob] = []
    for split, n in wanted.splits.items():
        for p in _leftovers(out / split):
            p.unlink()
            removed += 1
        for i, start in enumerate(range(0, n, shard_size)):
            jobs.append(ShardJob(split, i, start, min(start + shard_size, n), out / split / shard_name(i)))
    pending = [j for j in jobs if not j.path.exists()]
    for split in {j.split for j in pending}:  # index.json marks a complete split; this one is not (yet)
        (out / split / INDEX_FILE).unlink(missing_ok=True)
    return ShardPlan(out, source, audio_format, jobs, pending, removed)


_worker_source: RawSource | None = None


def _init_worker(source: RawSource) -> None:
    # the source (with its split plan) crosses to each worker once, not once per shard
    global _worker_source
    _worker_source = source


def _write_job(job: ShardJob, audio_format: str) -> int:
    assert _worker_source is not None
    return write_shard(job.path, _worker_source.samples(job.split, job.start, job.stop), audio_format)


def write_shards(
    plan: ShardPlan, *, workers: int = 1, on_samples: Callable[[int], None] | None = None
) -> list[SplitSummary]:
    """Write the pending shards, then each split's index.json; `on_samples(n)` reports progress.

    With `workers > 1`, shards are written by a process pool (1.5-2x on 2 cores; measured, the work
    is CPU-bound PNG/FLAC encoding and synthesis), and progress then moves a shard at a time.
    """
    if workers <= 1 or len(plan.pending) <= 1:
        for job in plan.pending:
            samples = plan.source.samples(job.split, job.start, job.stop)
            if on_samples is not None:
                samples = _counted(samples, on_samples)
            write_shard(job.path, samples, plan.audio_format)
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(plan.source,)) as pool:
            futures = {pool.submit(_write_job, job, plan.audio_format): job for job in plan.pending}
            for fut in as_completed(futures):
                fut.result()
                if on_samples is not None:
                    on_samples(futures[fut].samples)
    return [_write_index(plan, split) for split in dict.fromkeys(j.split for j in plan.jobs)]


def _counted(samples: Iterable[RawSample], on_samples: Callable[[int], None]) -> Iterator[RawSample]:
    for s in samples:
        yield s
        on_samples(1)


def _write_index(plan: ShardPlan, split: str) -> SplitSummary:
    jobs = [j for j in plan.jobs if j.split == split]
    shards = [{"name": j.path.name, "samples": j.samples, "bytes": j.path.stat().st_size} for j in jobs]
    total = sum(j.samples for j in jobs)
    index = {"split": split, "shards": shards, "total": total}
    write_text_atomic(plan.out / split / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    written = sum(1 for j in plan.pending if j.split == split)
    return SplitSummary(split, total, len(jobs), sum(s["bytes"] for s in shards), written, len(jobs) - written)


# ---------------------------------------------------------------------------------------------
# Reading


def list_shards(split_dir: str | os.PathLike) -> list[Path]:
    """The split's shard files in order; a missing or empty split says how to create it."""
    split_dir = Path(split_dir)
    shards = sorted(split_dir.glob(SHARD_GLOB)) if split_dir.is_dir() else []
    if not shards:
        what = "does not exist" if not split_dir.is_dir() else f"holds no {SHARD_GLOB}"
        raise UserError(f"{split_dir} {what}; create it with: {CREATE_HINT.format(out=split_dir.parent)}")
    return shards


def decode_sample(raw: dict, url: str = "?") -> RawSample:
    """Decode one webdataset sample (extension -> bytes); a bad member names the shard and key."""
    key = raw.get("__key__", "?")
    try:
        audio_ext = next(ext for ext in AUDIO_FORMATS if ext in raw)
        image = Image.open(io.BytesIO(raw["png"]))
        image.load()
        audio, sample_rate = sf.read(io.BytesIO(raw[audio_ext]), dtype="float32")
        return {
            "key": key,
            "image": image,
            "audio": audio,
            "sample_rate": int(sample_rate),
            "caption": raw["txt"].decode("utf-8"),
            "json": json.loads(raw["json"]),
        }
    except StopIteration:
        raise UserError(f"{url}: sample {key!r} has no audio member ({' or '.join(AUDIO_FORMATS)})") from None
    except KeyError as e:
        raise UserError(f"{url}: sample {key!r} has no {e.args[0]!r} member") from None
    except Exception as e:  # any decoder failure is a corrupt sample, which the user must be able to locate
        raise UserError(f"{url}: sample {key!r} cannot be decoded: {e}") from e


def iter_shard_samples(shard: str | os.PathLike) -> Iterator[RawSample]:
    """Every sample of one shard, in order, decoded."""
    for raw in wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None):
        yield decode_sample(raw, str(shard))


def iter_raw_samples(split_dir: str | os.PathLike) -> Iterator[RawSample]:
    """Every sample of a split, in shard order, decoded (PIL image, float32 audio, caption, json)."""
    for shard in list_shards(split_dir):
        yield from iter_shard_samples(shard)
