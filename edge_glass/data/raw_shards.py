"""Raw WebDataset shards: the one on-disk form of every raw source (the README's "Raw data" step).

    <out>/dataset.json               source, generation and writer parameters, split sizes, modalities
    <out>/<split>/shard-NNNNNN.tar   per sample: <key>.png|jpg, <key>.flac|wav, <key>.txt, <key>.json
    <out>/<split>/index.json         shard names, per-shard sample counts and bytes, total;
                                     written last, so it also marks the split complete

A sample always has its caption (txt) and metadata (json; a `label` field — a class name or any
group id — makes samples of one label positives of each other in evaluation, `eval.label_field`);
the image and the audio are each optional, because real sets are often bi-modal (PixMo: image + text, AudioCaps: audio + text).
`dataset.json` records which modalities the set has, by the names the rest of the package uses
(`vision`, `audio`, `text`; the files keep their kinds), and a reader gets None for a missing one.
Images a source already holds encoded (a downloaded JPEG or PNG) are stored as those bytes
(`jpg` or `png`): re-encoding would cost time and, for JPEG, quality.

Fetching sources. A source that downloads (see `FetchingSource`) may lose samples to dead links or
corrupt files. Its shard i holds what survived of candidates [i*shard_size, (i+1)*shard_size) of
the split, and a record `<split>/shard-NNNNNN.json` (written after the shard) says how many
samples the shard kept and which candidates it skipped, and why. The record, not the tar, marks
such a shard complete (a shard whose every candidate failed has a record and no tar). Each
split's index.json then also counts candidates and skips by reason, and `<out>/skipped.json`
lists every skipped candidate. Which candidate lands in which shard never depends on what failed,
so a resumed run writes the same shards as an uninterrupted one.

A shard is written under a temporary name and renamed when complete, so a reader never sees half
a shard and an interrupted run resumes by skipping every shard whose final file exists. That is
only sound if the existing shards came from the same parameters, so `dataset.json` is written
before the first shard and a re-run with other parameters is refused. Tar members carry mtime 0
and fixed owners, so the same samples give byte-identical shards. One writer per directory.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NotRequired, Protocol, Sequence, TypedDict

import numpy as np
import soundfile as sf
import webdataset as wds
from PIL import Image

from edge_glass.modalities import NAMES
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import atomic_path, write_text_atomic

AUDIO_FORMATS = ("flac", "wav")
IMAGE_FORMATS = ("png", "jpg")  # tar member extensions; jpg holds a source's own JPEG bytes
MODALITIES = NAMES  # the modality table's names: a raw set of images says "vision", like the rest
DATASET_FILE = "dataset.json"
INDEX_FILE = "index.json"
SKIPPED_FILE = "skipped.json"
SHARD_GLOB = "shard-*.tar"
RECORD_GLOB = "shard-*.json"
CREATE_HINT = "python scripts/download_datasets.py --dataset {source} --num_samples N --out {out}"


class RawSample(TypedDict):
    """One decoded sample, as sources produce it and `iter_raw_samples` gives it back.

    `image` and `audio` are None when the sample (and the set) has no such modality; then
    `sample_rate` is None too. A source that already holds the image encoded may pass
    `image_bytes` with `image_format` ("jpg" or "png") to store those bytes as they are.
    """

    key: str
    image: Image.Image | None
    audio: np.ndarray | None  # float32 mono in [-1, 1]
    sample_rate: int | None
    caption: str
    json: dict
    image_bytes: NotRequired[bytes]
    image_format: NotRequired[str]


class SkippedSample(Exception):
    """Raised by a fetching source for a candidate it cannot turn into a sample (dead URL,
    undecodable file, missing field): the writer records it and goes on, never aborts."""

    def __init__(self, reason: str, detail: str = "", **info: Any) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.info = info  # identifying fields worth keeping in skipped.json (url, row, ...)


class FetchTask(Protocol):
    key: str  # the sample key the candidate would get


class RawSource(Protocol):
    """What a raw source gives the writer; sample i of a split must not depend on which shards ran."""

    name: str

    def params(self) -> dict:
        """Generation parameters: stored in dataset.json and compared on re-runs."""

    def split_sizes(self) -> dict[str, int]: ...

    def samples(self, split: str, start: int, stop: int) -> Iterator[RawSample]: ...


class FetchingSource(RawSource, Protocol):
    """A source whose samples come over the network or from another library's files: its
    candidates are realised by a thread pool (the work is mostly waiting), may fail one by one
    (`SkippedSample`), and shards are written in order as their candidates complete."""

    modalities: tuple[str, ...]
    fetch_workers: int

    def tasks(self, split: str, start: int, stop: int) -> Sequence[FetchTask]:
        """Cheap descriptions of candidates [start, stop) of the split, in order."""

    def realize(self, task: FetchTask) -> RawSample:
        """Fetch, verify and decode one candidate; thread-safe; raises `SkippedSample`."""


def is_fetching(source: RawSource) -> bool:
    return callable(getattr(source, "realize", None)) and callable(getattr(source, "tasks", None))


def source_modalities(source: RawSource) -> list[str]:
    """The modalities a source's samples carry (sources that do not say have all three)."""
    mods = tuple(getattr(source, "modalities", MODALITIES))
    unknown = set(mods) - set(MODALITIES)
    if unknown or "text" not in mods:
        raise ValueError(f"source {source.name!r}: modalities must include 'text' and be among {MODALITIES}, got {mods}")
    return [m for m in MODALITIES if m in mods]


# ---------------------------------------------------------------------------------------------
# Encoding and one shard


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def record_path(shard: Path) -> Path:
    """A fetching source's per-shard record: `shard-NNNNNN.json` beside `shard-NNNNNN.tar`."""
    return shard.with_suffix(".json")


def encode_sample(sample: RawSample, audio_format: str = "flac") -> dict[str, str | bytes]:
    """The tar members of one sample: png|jpg, 16-bit PCM flac|wav, utf-8 txt, json (media only if present)."""
    key = sample["key"]
    if not key or "." in key or "/" in key:
        # webdataset groups members by the text before the first dot; a dot in the key splits a sample
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    members: dict[str, str | bytes] = {"__key__": key}
    if sample.get("image_bytes") is not None:
        fmt = sample.get("image_format")
        if fmt not in IMAGE_FORMATS:
            raise ValueError(f"sample {key!r}: image_format must be one of {IMAGE_FORMATS}, got {fmt!r}")
        members[fmt] = sample["image_bytes"]
    elif sample.get("image") is not None:
        png = io.BytesIO()
        sample["image"].save(png, format="PNG")
        members["png"] = png.getvalue()
    if sample.get("audio") is not None:
        sound = io.BytesIO()
        sf.write(sound, sample["audio"], sample["sample_rate"], format=audio_format.upper(), subtype="PCM_16")
        members[audio_format] = sound.getvalue()
    members["txt"] = sample["caption"].encode("utf-8")
    members["json"] = json.dumps(sample["json"], sort_keys=True, ensure_ascii=False).encode("utf-8")
    return members


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


def _write_fetched_shard(
    path: Path, candidates: int, results: Iterable[dict], on_result: Callable[[dict], None]
) -> dict:
    """Write the samples among `results` (tar members, or skip entries with a "reason") to `path`
    atomically, then its record; returns the record. A shard with no surviving sample gets a
    record and no tar (an empty tar would be a shard readers choke on)."""
    seen: set[str] = set()
    skipped: list[dict] = []
    kept = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0, encoder=False) as writer:
            for result in results:
                if "__key__" in result:
                    if result["__key__"] in seen:
                        raise ValueError(f"duplicate sample key {result['__key__']!r} in {path}")
                    seen.add(result["__key__"])
                    writer.write(result)
                    kept += 1
                else:
                    skipped.append(result)
                on_result(result)
    if kept == 0:
        path.unlink()
    record = {"name": path.name, "candidates": candidates, "samples": kept, "skipped": skipped}
    # The record is written after the tar is in place, so "record exists" implies "shard complete".
    write_text_atomic(record_path(path), json.dumps(record, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return record


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
    def fetching(self) -> bool:
        return is_fetching(self.source)

    @property
    def skipped(self) -> int:
        return len(self.jobs) - len(self.pending)

    @property
    def pending_samples(self) -> int:
        """Samples (for a fetching source: candidates) the pending shards hold."""
        return sum(j.samples for j in self.pending)


@dataclass(frozen=True)
class SplitSummary:
    split: str
    samples: int
    shards: int
    bytes: int
    written: int  # shards written by this run
    skipped: int  # shards already complete
    candidates: int = 0  # fetching sources: samples tried, kept or not
    skipped_samples: dict[str, int] = field(default_factory=dict)  # fetching sources: reason -> count


@dataclass(frozen=True)
class _Description:
    source: str
    params: dict
    splits: dict[str, int]
    modalities: list[str]

    def to_json(self) -> dict:
        return {
            "format": 1, "source": self.source, "params": self.params, "splits": self.splits,
            "modalities": self.modalities,
        }


def _describe(source: RawSource, shard_size: int, audio_format: str) -> _Description:
    # shard_size and audio_format change the bytes on disk too, so a resume must match them as well
    params = {**source.params(), "shard_size": shard_size, "audio_format": audio_format}
    return _Description(source.name, json.loads(json.dumps(params)), source.split_sizes(), source_modalities(source))


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
            for p in [*d.glob(SHARD_GLOB), *d.glob(RECORD_GLOB), d / INDEX_FILE, *_leftovers(d)]:
                p.unlink(missing_ok=True)
    (out / SKIPPED_FILE).unlink(missing_ok=True)
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
    # A fetching source's shard is complete when its record exists (the tar may be absent: every
    # candidate failed); any other shard when its tar does.
    done = (lambda j: record_path(j.path).exists()) if is_fetching(source) else (lambda j: j.path.exists())
    pending = [j for j in jobs if not done(j)]
    for split in {j.split for j in pending}:  # index.json marks a complete split; this one is not (yet)
        (out / split / INDEX_FILE).unlink(missing_ok=True)
    if pending:
        (out / SKIPPED_FILE).unlink(missing_ok=True)
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
    plan: ShardPlan,
    *,
    workers: int = 1,
    on_samples: Callable[[int], None] | None = None,
    on_skip: Callable[[dict], None] | None = None,
    fetch_workers: int | None = None,
) -> list[SplitSummary]:
    """Write the pending shards, then each split's index.json; `on_samples(n)` reports progress.

    With `workers > 1`, shards are written by a process pool (1.5-2x on 2 cores; measured, the work
    is CPU-bound PNG/FLAC encoding and synthesis), and progress then moves a shard at a time.

    A fetching source is realised by `fetch_workers` threads instead (default: the source's
    `fetch_workers`); `on_samples` then counts candidates, kept or skipped, and `on_skip(entry)`
    sees each skipped one. Its summary also goes to `<out>/skipped.json`.
    """
    if plan.fetching:
        _write_fetched(plan, fetch_workers or getattr(plan.source, "fetch_workers", 8), on_samples, on_skip)
        summaries = [_write_index(plan, split) for split in dict.fromkeys(j.split for j in plan.jobs)]
        _write_skipped(plan, summaries)
        return summaries
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


def _realize_encoded(source: RawSource, task: FetchTask, audio_format: str) -> dict:
    """Tar members of one candidate, or its skip entry: runs in a fetch thread, so the encoding
    (FLAC, the occasional PNG) is spread over the pool too."""
    try:
        return encode_sample(source.realize(task), audio_format)  # type: ignore[attr-defined]
    except SkippedSample as e:
        return {"key": task.key, "reason": e.reason, "detail": e.detail, **e.info}


def _write_fetched(
    plan: ShardPlan,
    threads: int,
    on_samples: Callable[[int], None] | None,
    on_skip: Callable[[dict], None] | None,
) -> None:
    """Realise the pending shards' candidates on a thread pool, in order, and write each shard as
    its candidates arrive. At most a bounded window of candidates is in flight, so memory stays
    flat, and the window runs across shard boundaries, so one slow URL near the end of a shard
    does not idle the pool."""
    source = plan.source
    window = max(4 * threads, 16)

    def ordered() -> Iterator[tuple[ShardJob, dict]]:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
        in_flight: deque[tuple[ShardJob, Future]] = deque()
        try:
            for job in plan.pending:
                for task in source.tasks(job.split, job.start, job.stop):  # type: ignore[attr-defined]
                    in_flight.append((job, pool.submit(_realize_encoded, source, task, plan.audio_format)))
                    if len(in_flight) >= window:
                        done_job, fut = in_flight.popleft()
                        yield done_job, fut.result()
            while in_flight:
                done_job, fut = in_flight.popleft()
                yield done_job, fut.result()
        finally:
            # On an error (or Ctrl-C) do not wait for queued fetches; running ones end at their timeout.
            pool.shutdown(wait=False, cancel_futures=True)

    def seen(result: dict) -> None:
        if on_samples is not None:
            on_samples(1)
        if on_skip is not None and "__key__" not in result:
            on_skip(result)

    for job, items in itertools.groupby(ordered(), key=lambda pair: pair[0]):
        _write_fetched_shard(job.path, job.samples, (result for _, result in items), seen)


def _read_record(job: ShardJob) -> dict:
    path = record_path(job.path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({e}); delete it to redo that shard, or pass --overwrite") from e


def _write_index(plan: ShardPlan, split: str) -> SplitSummary:
    jobs = [j for j in plan.jobs if j.split == split]
    written = sum(1 for j in plan.pending if j.split == split)
    if plan.fetching:
        records = [_read_record(j) for j in jobs]
        shards = [
            {"name": j.path.name, "samples": r["samples"], "bytes": j.path.stat().st_size}
            for j, r in zip(jobs, records)
            if r["samples"] > 0
        ]
        reasons = Counter(e["reason"] for r in records for e in r["skipped"])
        candidates = sum(r["candidates"] for r in records)
        total = sum(s["samples"] for s in shards)
        index = {
            "split": split, "shards": shards, "total": total,
            "candidates": candidates, "skipped": dict(sorted(reasons.items())),
        }
        write_text_atomic(plan.out / split / INDEX_FILE, json.dumps(index, indent=2) + "\n")
        return SplitSummary(
            split, total, len(shards), sum(s["bytes"] for s in shards), written, len(jobs) - written,
            candidates, dict(sorted(reasons.items())),
        )
    shards = [{"name": j.path.name, "samples": j.samples, "bytes": j.path.stat().st_size} for j in jobs]
    total = sum(j.samples for j in jobs)
    index = {"split": split, "shards": shards, "total": total}
    write_text_atomic(plan.out / split / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return SplitSummary(split, total, len(jobs), sum(s["bytes"] for s in shards), written, len(jobs) - written, total)


def _write_skipped(plan: ShardPlan, summaries: list[SplitSummary]) -> None:
    """`<out>/skipped.json`: counts per reason (overall and per split) and every skipped candidate."""
    entries = []
    for job in plan.jobs:
        entries += [{"split": job.split, **e} for e in _read_record(job)["skipped"]]
    reasons = Counter(e["reason"] for e in entries)
    report = {
        "source": plan.source.name,
        "candidates": sum(s.candidates for s in summaries),
        "kept": sum(s.samples for s in summaries),
        "skipped": len(entries),
        "by_reason": dict(sorted(reasons.items())),
        "by_split": {s.split: s.skipped_samples for s in summaries},
        "samples": entries,
    }
    write_text_atomic(plan.out / SKIPPED_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Reading


def _source_name(out: Path) -> str:
    """The source a raw directory was made from (for hints), or 'synthetic' when unknown."""
    try:
        return str(json.loads((out / DATASET_FILE).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return "synthetic"


def list_shards(split_dir: str | os.PathLike) -> list[Path]:
    """The split's shard files in order; a missing or empty split says how to create it."""
    split_dir = Path(split_dir)
    shards = sorted(split_dir.glob(SHARD_GLOB)) if split_dir.is_dir() else []
    if not shards:
        what = "does not exist" if not split_dir.is_dir() else f"holds no {SHARD_GLOB}"
        hint = CREATE_HINT.format(source=_source_name(split_dir.parent), out=split_dir.parent)
        raise UserError(f"{split_dir} {what}; create it with: {hint}")
    return shards


def decode_sample(raw: dict, url: str = "?") -> RawSample:
    """Decode one webdataset sample (extension -> bytes); a bad member names the shard and key.

    The caption and json are required; the image (png|jpg) and audio (flac|wav) are None when the
    sample has none (an image-only or audio-only set)."""
    key = raw.get("__key__", "?")
    try:
        image_ext = next((ext for ext in (*IMAGE_FORMATS, "jpeg") if ext in raw), None)
        audio_ext = next((ext for ext in AUDIO_FORMATS if ext in raw), None)
        image = None
        if image_ext is not None:
            image = Image.open(io.BytesIO(raw[image_ext]))
            image.load()
        audio, sample_rate = None, None
        if audio_ext is not None:
            audio, sample_rate = sf.read(io.BytesIO(raw[audio_ext]), dtype="float32")
            sample_rate = int(sample_rate)
        return {
            "key": key,
            "image": image,
            "audio": audio,
            "sample_rate": sample_rate,
            "caption": raw["txt"].decode("utf-8"),
            "json": json.loads(raw["json"]),
        }
    except KeyError as e:
        raise UserError(f"{url}: sample {key!r} has no {e.args[0]!r} member") from None
    except Exception as e:  # any decoder failure is a corrupt sample, which the user must be able to locate
        raise UserError(f"{url}: sample {key!r} cannot be decoded: {e}") from e


def iter_shard_raw(shard: str | os.PathLike) -> Iterator[dict]:
    """Every sample of one shard, in order, as the tar holds it (extension -> bytes, `__key__`):
    reading without decoding is cheap, so extraction's workers can each skip to their batches."""
    yield from wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)


def iter_shard_samples(shard: str | os.PathLike) -> Iterator[RawSample]:
    """Every sample of one shard, in order, decoded."""
    for raw in iter_shard_raw(shard):
        yield decode_sample(raw, str(shard))


def iter_raw_samples(split_dir: str | os.PathLike) -> Iterator[RawSample]:
    """Every sample of a split, in shard order, decoded (PIL image, float32 audio, caption, json)."""
    for shard in list_shards(split_dir):
        yield from iter_shard_samples(shard)
