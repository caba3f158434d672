"""Rows of a Hugging Face table as raw-shard candidates: load, choose, split, verify the media.

What every real source (PixMo, AudioCaps, Localized Narratives) shares:

* **Loading.** `load_table` calls `datasets.load_dataset` with the hub id (the default) or with a
  local copy (`--hf_path`: a dataset directory as `huggingface-cli download` leaves it, a
  `save_to_disk` directory, or parquet/json(l) files), so tests and offline users run exactly the
  code path a hub user runs. A hub that cannot be reached is one `UserError` line that names the
  dataset and says how to point at a local copy.
* **Choosing.** A source groups its rows by the thing that must not be split across train and test
  (an image for QA rows, a clip for several captions) and takes the first `num_samples` groups of
  a permutation seeded by `--seed`. The permutation depends only on the seed and the number of
  groups, so a larger `num_samples` extends a smaller one rather than reshuffling it.
* **Splitting.** A group's split comes from a hash of (seed, group key) against the split
  fractions (`split_of`), never from its position or from which downloads failed: a dead link
  removes a sample without moving any other one to another split, and the same image lands in
  the same split in runs of any size.
* **Verifying.** Downloaded images must decode completely (`Image.verify`, then a full `load`,
  because verify alone passes truncated JPEGs) and be at least `min_image_side` pixels on their
  short side; audio must decode with libsndfile and be non-empty. Failures become
  `SkippedSample`s with a reason, which the shard writer counts.

`CandidateSource` does all of this for a source (and checks the common options, records them for
dataset.json and lays out the samples), so each source file holds only what is its own: its
tables and columns, how rows group, and how a row becomes a sample.

The skip reasons, as skipped.json and the run's summary count them:

    bad_url, http_error, timeout, network, too_large    the download (see http_fetch.py)
    undecodable      not an image / audio file, or truncated, or an image over PIL's pixel limit
                     ("too_large" when between 1x and 2x that limit)
    too_small        an image under min_image_side on its short side
    hash_mismatch    the URL now serves other bytes than the table's image_sha256
    missing_fields   a row without the caption, URL, question/answer or media it needs
    no_image_url     (Localized Narratives) an image from a collection with no public URL
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import soundfile as sf
from PIL import Image

from edge_glass.data.http_fetch import FetchFailed, FetchPolicy, FetchStats, fetch
from edge_glass.data.raw_shards import RawSample, SkippedSample
from edge_glass.utils.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
DEFAULT_MIN_IMAGE_SIDE = 32
DEFAULT_SAMPLE_RATE = 16000  # what Whisper reads; 0 keeps each file's own rate
MIN_AUDIO_SECONDS = 0.1

# SeedSequence streams for choosing groups: a tag per purpose, so the choice never coincides with
# any other seeded draw of the same seed.
_CHOOSE_STREAM = 0x43484F53  # "CHOS"
_ORDER_STREAM = 0x4F524452  # "ORDR"


# ---------------------------------------------------------------------------------------------
# Loading


def load_table(
    hub_id: str,
    *,
    local: str | os.PathLike | None = None,
    config: str | None = None,
    split: str = "train",
    what: str = "dataset",
    data_files: str | Sequence[str] | None = None,
    loose: bool = False,
):
    """`datasets.load_dataset(hub_id or local, config, split=split)` as a `datasets.Dataset`.

    `local` may be a dataset directory (hub layout, README configs included), a `save_to_disk`
    directory, or one parquet/json/jsonl/csv file; with `loose`, a directory is a bag of such
    files that together form `split`. `data_files` (with hub_id naming a packaged builder such
    as "json") loads files by URL instead of from a hub repository.
    """
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading the {what} needs the `datasets` library: pip install 'edge-glass[download]'") from None

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    where = str(local) if local is not None else hub_id
    try:
        if local is not None:
            table = _load_local(Path(local), config, split, loose)
        elif data_files is not None:
            table = datasets.load_dataset(hub_id, data_files=data_files, split=split)
        else:
            table = datasets.load_dataset(hub_id, config, split=split)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for "not there" (ConnectionError, FileNotFoundError, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = (
            f"check the path and --hf_split {split!r}"
            if local is not None
            else "the hub may be unreachable: download a copy and pass --hf_path DIR, "
            "or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache"
        )
        raise UserError(f"cannot load {what} {where!r} (split {split!r}): {type(e).__name__}: {first}; {hint}") from e
    if isinstance(table, datasets.DatasetDict):  # save_to_disk of a DatasetDict
        if split not in table:
            raise UserError(f"{what} {where!r} has splits {sorted(table)}, not {split!r}; pass --hf_split")
        table = table[split]
    return table


def _load_local(path: Path, config: str | None, split: str, loose: bool):
    import datasets

    if not path.exists():
        raise UserError(f"--hf_path {path} does not exist")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return datasets.load_from_disk(str(path))
    if path.is_file() or loose:
        # Loose data files are all one split. (load_dataset on a directory would instead infer
        # splits from file names, and e.g. 'coco_val_localized_narratives.jsonl' reads as "val".)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in _BUILDERS)
        builders = {_BUILDERS.get(p.suffix.lower()) for p in files}
        if not files or None in builders or len(builders) != 1:
            raise UserError(f"--hf_path {path}: expected {', '.join(_BUILDERS)} file(s) of one kind")
        return datasets.load_dataset(builders.pop(), data_files={split: [str(p) for p in files]}, split=split)
    return datasets.load_dataset(str(path), config, split=split)


_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def undecoded(table, column: str):
    """`table` with its Image/Audio `column` read as {"bytes", "path"}: the sources verify and decode
    media themselves (and datasets' own audio decoding would need torchcodec)."""
    import datasets

    feature = table.features.get(column)
    if isinstance(feature, datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, datasets.Audio):
        return table.cast_column(column, datasets.Audio(decode=False))
    return table


def column(table, name: str) -> list:
    """A whole column as Python values, read from Arrow directly (fast, no per-row formatting)."""
    return table.data.column(name).to_pylist()


def describe_location(hub_id: str, local: str | os.PathLike | None) -> str:
    """What dataset.json records as the data's origin: the hub id, or the local copy's absolute path."""
    return hub_id if local is None else f"local:{Path(local).resolve()}"


def require_columns(table, needed: Sequence[str], what: str, any_of: Sequence[Sequence[str]] = ()) -> None:
    """Refuse a table that lacks the columns a source reads, naming what it has instead."""
    have = set(table.column_names)
    missing = [c for c in needed if c not in have]
    missing += [" or ".join(group) for group in any_of if not have.intersection(group)]
    if missing:
        raise UserError(f"{what}: missing column(s) {', '.join(missing)} (it has: {', '.join(sorted(have))})")


# ---------------------------------------------------------------------------------------------
# Choosing and splitting


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS):
        raise UserError(f"--split_fractions needs {len(SPLITS)} numbers (train val test), got {len(fractions)}")
    if any(not math.isfinite(f) or f < 0 for f in fractions):
        raise UserError(f"--split_fractions must be finite and non-negative, got {list(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"--split_fractions must sum to 1, got {list(fractions)} (sum {sum(fractions):g})")
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def check_count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_sample_rate(value: int) -> int:
    """A target rate for decoded audio: 0 keeps each file's own rate; a few hundred Hz would be a
    typo (kHz for Hz), not a choice, so anything under 1000 is refused."""
    rate = check_count("sample_rate", value, 0)
    if 0 < rate < 1000:
        raise UserError(f"--sample_rate must be 0 (keep) or at least 1000 Hz, got {value}")
    return rate


def split_of(group: str, seed: int, fractions: Sequence[float]) -> str:
    """The split of a group: a uniform draw from sha256(seed, group) against the cumulative fractions."""
    digest = hashlib.sha256(f"{seed}\0{group}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for split, f in zip(SPLITS, fractions):
        edge += f
        if u < edge:
            return split
    return next(s for s, f in reversed(list(zip(SPLITS, fractions))) if f > 0)  # u within rounding of 1.0


def group_rows(keys: Sequence[Any]) -> tuple[list[str], list[list[int]]]:
    """Distinct group keys in order of first appearance, and each group's row indices."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(str(key), []).append(row)
    return list(groups), list(groups.values())


def choose(n_groups: int, num: int, seed: int, stream: int = 0) -> list[int]:
    """`num` group indices out of `n_groups`: the prefix of a permutation seeded by (seed, stream)."""
    order = np.random.default_rng([seed, _CHOOSE_STREAM, stream]).permutation(n_groups)
    return order[:num].tolist()


def shuffled(items: list, seed: int, split: str) -> list:
    """A seeded shuffle of one split's candidates, so each shard mixes rows from across the table."""
    order = np.random.default_rng([seed, _ORDER_STREAM, SPLITS.index(split)]).permutation(len(items))
    return [items[i] for i in order.tolist()]


def warn_short(what: str, wanted: int, have: int, stacklevel: int = 3) -> None:
    """Say that a table gives fewer groups than asked for (the default `stacklevel` points at
    the caller of the function that calls this, i.e. the code that built the source)."""
    if have < wanted:
        warnings.warn(
            f"{what} has only {have} usable groups; taking all of them instead of {wanted}", UserWarning, stacklevel=stacklevel
        )


# ---------------------------------------------------------------------------------------------
# Candidates and the source base class


@dataclass(frozen=True)
class Candidate:
    """One would-be sample: its key, its split, the group it belongs to and the source's data."""

    key: str
    split: str
    index: int
    group: str
    data: dict = field(hash=False, compare=False)


def sample_key(split: str, index: int) -> str:
    """`train-00000042`: unique across splits, and dot-free because webdataset splits keys at the first dot."""
    return f"{split}-{index:08d}"


def assign(items: list[tuple[str, dict]], seed: int, fractions: Sequence[float]) -> dict[str, list[Candidate]]:
    """(group, data) pairs -> candidates per split, each split shuffled and numbered."""
    by_split: dict[str, list[tuple[str, dict]]] = {s: [] for s in SPLITS}
    for group, data in items:
        by_split[split_of(group, seed, fractions)].append((group, data))
    out = {}
    for split, members in by_split.items():
        out[split] = [
            Candidate(sample_key(split, i), split, i, group, data)
            for i, (group, data) in enumerate(shuffled(members, seed, split))
        ]
    return out


class CandidateSource:
    """Base of the fetching sources: the choice of candidates, the fetch policy, and what
    dataset.json records about both.

    The real sources differ only in where their rows come from and how a row becomes a sample;
    the rest lives here, so that they check their options with the same messages, choose and
    split groups the same way, record their parameters the same way and build samples of the
    same layout. A subclass sets `name` and `modalities`; its `__init__` keeps its own signature
    (the registry offers a source the options its signature names), passes the common options on
    (`min_image_side` / `sample_rate` only for the media it has), loads its rows (`load_hub_table`
    for one hub table) and fills the candidates with `set_candidates` over `pick`ed groups; and
    it implements `realize(candidate)`, usually ending in `sample(...)`, plus `origin()` unless
    it reads that one hub table.
    """

    name = "?"
    modalities: tuple[str, ...] = ("vision", "text")

    def __init__(
        self,
        num_samples: int,
        seed: int,
        fractions: Sequence[float],
        fetch_policy: FetchPolicy | None = None,
        *,
        min_image_side: int | None = None,
        sample_rate: int | None = None,
    ) -> None:
        self.fetch_policy = fetch_policy or FetchPolicy()
        self.fetch_stats = FetchStats()
        self._candidates: dict[str, list[Candidate]] = {s: [] for s in SPLITS}
        self._table_lock = threading.Lock()
        self.num_samples = check_count("num_samples", num_samples)
        self.seed = check_count("seed", seed, 0)
        self.fractions = check_fractions(fractions)
        # A media setting is a parameter only of a source with that medium: an image-only set's
        # dataset.json has no sample_rate, so it cannot refuse a resume over one.
        self._media_params: dict[str, int] = {}
        if min_image_side is not None:
            self.min_image_side = self._media_params["min_image_side"] = check_count("min_image_side", min_image_side)
        if sample_rate is not None:
            self.sample_rate = self._media_params["sample_rate"] = check_sample_rate(sample_rate)

    # Choosing the rows -------------------------------------------------------------------------

    def load_hub_table(self, hub_id: str, hf_path: str | None, hf_split: str, what: str,
                       columns: Sequence[str], any_of: Sequence[Sequence[str]] = ()):
        """`self.table`: split `hf_split` of `hub_id` (or of its local copy at `hf_path`), refused
        without `columns`; also records where it came from, for `origin`."""
        self.hf_split = hf_split
        self.location = describe_location(hub_id, hf_path)
        self.table = load_table(hub_id, local=hf_path, split=hf_split, what=what)
        require_columns(self.table, columns, f"{what} ({self.location})", any_of)
        return self.table

    def pick(self, n_groups: int, what: str, num: int | None = None, stream: int = 0) -> list[int]:
        """`num` (default `num_samples`) of `n_groups` group indices, chosen with this source's
        seed (see `choose`); a warning names `what` when it has fewer groups than that."""
        num = self.num_samples if num is None else num
        warn_short(what, num, n_groups, stacklevel=4)  # at the code that built the source
        return choose(n_groups, num, self.seed, stream)

    def set_candidates(self, items: list[tuple[str, dict]]) -> None:
        """The chosen (group, data) pairs become the candidates, split by group (see `assign`)."""
        self._candidates = assign(items, self.seed, self.fractions)

    # What dataset.json records ---------------------------------------------------------------

    def params(self) -> dict:
        """Where the rows came from, how they were chosen and split, and the media settings.
        (The keys keep the order each source has always written, so dataset.json is unchanged.)"""
        return {
            **self.origin(),
            "num_samples": self.num_samples,
            **self.choice_params(),
            "seed": self.seed,
            "split_fractions": list(self.fractions),
            **self._media_params,
        }

    def origin(self) -> dict:
        """Where the rows came from: here, the one table `load_hub_table` loaded."""
        return {"hf_dataset": self.location, "hf_split": self.hf_split, "hf_rows": len(self.table)}

    def choice_params(self) -> dict:
        """Options of the choice beyond num_samples and seed (pixmo_qa's per-subset caps)."""
        return {}

    @property
    def fetch_workers(self) -> int:
        return self.fetch_policy.workers

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self._candidates[s]) for s in SPLITS}

    def tasks(self, split: str, start: int, stop: int) -> list[Candidate]:
        return self._candidates[split][start:stop]

    def samples(self, split: str, start: int, stop: int) -> Iterator[RawSample]:
        """The candidates that survive, one by one (for library use; the writer uses a thread pool)."""
        for c in self.tasks(split, start, stop):
            try:
                yield self.realize(c)
            except SkippedSample:
                continue

    def realize(self, candidate: Candidate) -> RawSample:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(
        self,
        c: Candidate,
        caption: str,
        meta: dict,
        *,
        image: VerifiedImage | None = None,
        audio: tuple[np.ndarray, int] | None = None,
    ) -> RawSample:
        """Candidate `c` as a `RawSample`: the verified image kept as its own bytes, and the json
        fields every source records (source, id, split, the image's size and format, the audio's
        length) under the source's own `meta`."""
        out: dict[str, Any] = {"key": c.key, "image": None, "audio": None, "sample_rate": None, "caption": caption}
        info: dict[str, Any] = {"source": self.name, "id": c.key, "split": c.split}
        if image is not None:
            out.update(image_bytes=image.data, image_format=image.format)
            info.update(image_size=list(image.size), image_format=image.format)
        if audio is not None:
            out["audio"], out["sample_rate"] = audio
            info["audio_seconds"] = round(audio[0].shape[0] / audio[1], 3)
        out["json"] = {**info, **meta}
        return out  # type: ignore[return-value]

    # Helpers for subclasses ------------------------------------------------------------------

    def get(self, url: str, what: str) -> bytes:
        """Fetch `url` or skip the candidate, keeping the URL in the skip entry."""
        try:
            return fetch(url, self.fetch_policy, self.fetch_stats)
        except FetchFailed as e:
            raise SkippedSample(e.reason, f"{what}: {e.detail}", url=url) from None

    @staticmethod
    @contextmanager
    def skip_info(**info: Any) -> Iterator[None]:
        """Add identifying fields (row, url, ...) to any `SkippedSample` raised inside, for skipped.json."""
        try:
            yield
        except SkippedSample as e:
            raise SkippedSample(e.reason, e.detail, **{**info, **e.info}) from None

    def row(self, table, index: int) -> dict:
        """One row of a `datasets` table; serialised because the table's formatter is not
        documented as thread-safe and the read is cheap next to a download."""
        with self._table_lock:
            return table[int(index)]


# ---------------------------------------------------------------------------------------------
# Media


@dataclass(frozen=True)
class VerifiedImage:
    data: bytes  # what goes into the shard
    format: str  # "jpg" or "png"
    size: tuple[int, int]


def verify_image(data: bytes | None, min_side: int, what: str = "image") -> VerifiedImage:
    """Check that `data` is a complete image of at least `min_side` px; keep JPEG/PNG bytes as they
    are and re-encode anything else (WebP, GIF, BMP, ...) as PNG. Raises `SkippedSample`."""
    if not data:
        raise SkippedSample("undecodable", f"{what}: empty body")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # > 2x MAX_IMAGE_PIXELS raises here
            pixels = probe.size[0] * probe.size[1]
            if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
                # PIL only warns up to 2x its limit; a possible decompression bomb is not worth
                # decoding. (Checked by hand: warnings.catch_warnings is not thread-safe.)
                raise SkippedSample("too_large", f"{what}: {probe.size[0]}x{probe.size[1]} px is over PIL's limit")
            probe.verify()  # structure and checksums, without decoding pixels
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every pixel: catches truncated files verify() lets through
    except SkippedSample:
        raise
    except Exception as e:  # PIL raises many types for bad input; all mean "not a usable image"
        raise SkippedSample("undecodable", f"{what}: {_error_text(e)}") from None
    if min(image.size) < min_side:
        raise SkippedSample("too_small", f"{what}: {image.size[0]}x{image.size[1]} px, under {min_side} px")
    if image.format == "JPEG":
        return VerifiedImage(data, "jpg", image.size)
    if image.format == "PNG":
        return VerifiedImage(data, "png", image.size)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP: the first frame
        if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB")  # CMYK, YCbCr, ...: PNG has no such mode
        png = io.BytesIO()
        image.save(png, format="PNG")
    except Exception as e:  # a format PIL reads but cannot re-encode as it stands
        raise SkippedSample("undecodable", f"{what}: cannot re-encode {image.format} as PNG: {_error_text(e)}") from None
    return VerifiedImage(png.getvalue(), "png", image.size)


def decode_audio(data: bytes | None, target_rate: int, what: str = "audio") -> tuple[np.ndarray, int]:
    """Mono float32 audio from any file libsndfile reads (FLAC, WAV, OGG Vorbis/Opus, MP3),
    resampled to `target_rate` (0 keeps the file's rate). Raises `SkippedSample`."""
    from edge_glass.encoders.audio import resample, to_mono

    if not data:
        raise SkippedSample("undecodable", f"{what}: empty body")
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as e:  # libsndfile's errors for unknown or corrupt formats
        raise SkippedSample("undecodable", f"{what}: {_error_text(e)}") from None
    audio = to_mono(audio)
    if audio.shape[0] < MIN_AUDIO_SECONDS * rate or not np.isfinite(audio).all():
        raise SkippedSample("undecodable", f"{what}: {audio.shape[0] / rate:.3f} s or non-finite samples")
    if target_rate and target_rate != rate:
        audio = resample(audio, int(rate), target_rate)
        rate = target_rate
    return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False), int(rate)


def _error_text(e: Exception) -> str:
    """An exception as one line without object addresses ("<_io.BytesIO object at 0x7f...>"),
    so the same bad file gives the same skip record in every run (records are compared byte-wise)."""
    message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {message[0] if message else ''}".rstrip(": ")


def media_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a `datasets` Image/Audio cell read with decode=False
    ({"bytes", "path"}), falling back to the file at `path` when the bytes are not embedded."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        path = value.get("path")
        if path and os.path.isfile(path):
            return Path(path).read_bytes()
    return None


def text(value: Any) -> str:
    """A stripped string, or "" for None/non-strings (missing fields are checked by the caller)."""
    return value.strip() if isinstance(value, str) else ""
