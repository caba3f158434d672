"""Your own WebDataset shards as a raw set (`--dataset webdataset`): img2dataset's output,
LAION/DataComp-style `{00000..00999}.tar`, or any tar files whose members share a key.

    python scripts/download_datasets.py --dataset webdataset --source /data/laion/ --out data/raw/mine
    python scripts/download_datasets.py --dataset webdataset --source '/data/cc/{00000..00099}.tar' \\
        --map caption=json.text --map label=json.class --out data/raw/mine

`--source` is a folder (every `*.tar` in it, in name order: img2dataset's `00000.tar` next to its
`_stats.json` and `.parquet` files), a brace pattern, or a `.txt` file listing one shard per line
(relative to the list). A sample is the members that share a key (the member name up to its
first dot, as webdataset groups them):

    image     jpg | jpeg | png | webp (any format Pillow reads; JPEG and PNG are kept as they are,
              others re-encoded as PNG)
    audio     flac | wav | mp3 | ogg (decoded, mixed to mono, resampled to --sample_rate, stored as FLAC)
    caption   txt, else caption, else json.caption
    json      metadata, kept whole under `meta` in the sample's own JSON

`--map FIELD=SOURCE` names another member (`--map image=jpeg`) or a JSON field, a dotted path into
the `json` member (`--map caption=json.text`); `label` (default: none) becomes the sample's `label`,
which evaluation uses for multi-positive retrieval and zero-shot classification. A mapping that
the first sample does not satisfy is refused in one line that lists what the sample has.

The shards are read in place, not copied first: one pass over the tar headers indexes every
member's offset (tar has no index of its own), then each sample is read, validated as extraction
would (a complete image at least --min_image_side px, decodable audio of at least 0.1 s, a
non-empty caption) and written. A sample that fails is skipped and counted by reason in
`skipped.json`, never the whole import. Splits are drawn per sample from a hash of its shard and
key (`--split_fractions`, default 70/15/15), so adding shards later moves no sample between
splits; a re-run with the same arguments resumes.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_glass.data.hf_rows import (
    DEFAULT_FRACTIONS,
    DEFAULT_MIN_IMAGE_SIDE,
    DEFAULT_SAMPLE_RATE,
    Candidate,
    CandidateSource,
    decode_audio,
    text,
    verify_image,
)
from edge_glass.data.http_fetch import FetchPolicy
from edge_glass.data.raw_shards import RawSample, SkippedSample
from edge_glass.utils.errors import UserError

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
AUDIO_MEMBERS = ("flac", "wav", "mp3", "ogg")
CAPTION_MEMBERS = ("txt", "caption")
FIELDS = ("caption", "image", "audio", "label")
"""What `--map` can point elsewhere."""
_SCAN_SAMPLES = 64
"""Samples of the first shard looked at to tell which modalities the set has."""


def shard_paths(source: str) -> list[Path]:
    """The shards `source` names: a folder's `*.tar`, a brace pattern, or a list file."""
    import braceexpand

    path = Path(os.path.expanduser(source))
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
        if not found:
            raise UserError(f"--source {source}: no .tar shards in this folder")
        return found
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        found = [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    else:
        found = [Path(os.path.expanduser(p)) for p in braceexpand.braceexpand(source)]
    missing = [p for p in found if not p.is_file()]
    if missing:
        raise UserError(f"--source {source}: {len(missing)} of {len(found)} shard(s) not found, first {missing[0]}")
    if not found:
        raise UserError(f"--source {source}: names no shards")
    return found


@dataclass(frozen=True)
class Member:
    """Where one tar member's bytes are."""

    offset: int
    size: int


def index_shard(path: Path) -> dict[str, dict[str, Member]]:
    """key -> extension -> member, for every regular file in the tar, in tar order (one pass over
    the headers; the data is skipped by seeking)."""
    samples: dict[str, dict[str, Member]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                if base.startswith(".") or "." not in base:
                    continue  # hidden files and extension-less members are not sample fields
                stem, ext = base.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower()] = Member(info.offset_data, info.size)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path}: not a readable tar shard ({e})") from None
    return samples


def parse_map(items: Sequence[str]) -> dict[str, str]:
    """`FIELD=SOURCE` items -> {field: source}; an unknown field or a malformed item is one line."""
    out: dict[str, str] = {}
    for item in items:
        field, sep, where = item.partition("=")
        if not sep or not where:
            raise UserError(f"--map {item!r}: expected FIELD=SOURCE, e.g. caption=json.text or image=jpeg")
        if field not in FIELDS:
            raise UserError(f"--map {item!r}: unknown field {field!r} (one of {', '.join(FIELDS)})")
        if where.startswith("json.") and len(where) == 5:
            raise UserError(f"--map {item!r}: json. needs a field name after it")
        out[field] = where
    return out


def _json_field(meta: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        meta = meta.get(part) if isinstance(meta, dict) else None
    return meta


class WebDatasetSource(CandidateSource):
    """Samples of the user's own WebDataset tar shards (see the module doc)."""

    name = "webdataset"

    def __init__(
        self,
        source: str,
        num_samples: int | None = None,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        field_map: Sequence[str] = (),
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        fetch: FetchPolicy | None = None,
    ) -> None:
        self.source = source
        self.shards = shard_paths(source)
        self.field_map = parse_map(field_map)
        self._root = Path(os.path.commonpath([str(p.parent) for p in self.shards]))
        items: list[tuple[str, dict]] = []
        first: tuple[str, dict[str, Member]] | None = None
        for shard_index, path in enumerate(self.shards):
            members = index_shard(path)
            if first is None and members:
                first = next(iter(members.items()))
                self._check_map(path, *first)  # before anything is inferred from a mapping that is wrong
                self.modalities = self._modalities(path, members)
            for key, fields in members.items():
                # The group (what the split hash reads) is the shard's place and the key: stable when shards are added.
                items.append((f"{path.relative_to(self._root)}/{key}", {"shard": shard_index, "key": key, "members": fields}))
        if first is None:
            raise UserError(f"--source {source}: the shards hold no samples")
        self.samples_in_shards = len(items)
        super().__init__(num_samples or len(items), seed, fractions, fetch,
                         min_image_side=min_image_side if "vision" in self.modalities else None,
                         sample_rate=sample_rate if "audio" in self.modalities else None)
        chosen = self.pick(len(items), f"--source {source}") if num_samples else range(len(items))
        self.set_candidates([items[i] for i in chosen])

    # What the set holds -------------------------------------------------------------------------

    def _member(self, fields: dict[str, Member], field: str, defaults: Sequence[str]) -> str | None:
        """The member extension that holds `field` for this sample (None: it has none)."""
        where = self.field_map.get(field)
        if where is not None:
            return None if where.startswith("json.") else where if where in fields else None
        return next((ext for ext in defaults if ext in fields), None)

    def _modalities(self, path: Path, members: dict[str, dict[str, Member]]) -> tuple[str, ...]:
        head = list(members.values())[:_SCAN_SAMPLES]
        mods = [m for m, field, defaults in (("vision", "image", IMAGE_MEMBERS), ("audio", "audio", AUDIO_MEMBERS))
                if any(self._member(f, field, defaults) for f in head)]
        if not mods:
            raise UserError(f"{path}: its first {len(head)} samples have no image ({', '.join(IMAGE_MEMBERS)}) or audio "
                            f"({', '.join(AUDIO_MEMBERS)}) member; name yours with --map image=EXT or --map audio=EXT")
        return (*mods, "text")

    def _check_map(self, path: Path, key: str, fields: dict[str, Member]) -> None:
        """Every mapping must hold for the first sample: a typo would otherwise skip every sample."""
        try:
            meta = self._read_json(path, fields, key) if "json" in fields else None
        except SkippedSample:
            meta = None  # an unreadable json member is that sample's skip, not the import's end
        for field, where in self.field_map.items():
            if where.startswith("json."):
                ok = _json_field(meta, where[5:]) is not None
            else:
                ok = where in fields
            if not ok:
                keys = ", ".join(sorted(meta)) if isinstance(meta, dict) else "no json member"
                raise UserError(f"--map {field}={where}: the first sample ({key!r} in {path}) has no {where}; "
                                f"its members: {', '.join(sorted(fields))}; its json fields: {keys}")

    def origin(self) -> dict:
        return {"source": str(self.source), "shards": len(self.shards), "samples_in_shards": self.samples_in_shards,
                "field_map": dict(sorted(self.field_map.items()))}

    # One sample ---------------------------------------------------------------------------------

    def _read(self, path: Path, member: Member) -> bytes:
        try:
            with open(path, "rb") as f:
                f.seek(member.offset)
                data = f.read(member.size)
        except OSError as e:  # the shard moved or lost its permissions since it was indexed
            raise SkippedSample("unreadable", f"{path}: {e.strerror or e}") from None
        if len(data) != member.size:
            raise SkippedSample("truncated", f"{path}: member at {member.offset} is cut short")
        return data

    def _read_json(self, path: Path, fields: dict[str, Member], key: str) -> dict:
        try:
            meta = json.loads(self._read(path, fields["json"]))
        except (ValueError, UnicodeDecodeError) as e:
            raise SkippedSample("missing_fields", f"{key}: json member is not JSON ({e})") from None
        return meta if isinstance(meta, dict) else {"value": meta}

    def _text(self, path: Path, fields: dict[str, Member], meta: dict | None, field: str, defaults: Sequence[str]):
        where = self.field_map.get(field)
        if where is not None and where.startswith("json."):
            return _json_field(meta, where[5:])
        ext = self._member(fields, field, defaults)
        if ext is None:
            return _json_field(meta, field) if field == "caption" and where is None else None
        try:
            return self._read(path, fields[ext]).decode("utf-8")
        except UnicodeDecodeError:
            raise SkippedSample("missing_fields", f"{field} member {ext} is not UTF-8 text") from None

    def realize(self, c: Candidate) -> RawSample:
        path = self.shards[c.data["shard"]]
        fields: dict[str, Member] = c.data["members"]
        key = c.data["key"]
        info = {"shard": str(path), "key": key}
        with self.skip_info(**info):
            meta = self._read_json(path, fields, key) if "json" in fields else None
            caption = text(self._text(path, fields, meta, "caption", CAPTION_MEMBERS))
            if not caption:
                raise SkippedSample("missing_fields", f"{key}: no caption")
            image = audio = None
            if "vision" in self.modalities:
                ext = self._member(fields, "image", IMAGE_MEMBERS)
                if ext is None:
                    raise SkippedSample("missing_fields", f"{key}: no image member")
                image = verify_image(self._read(path, fields[ext]), self.min_image_side, f"{key}.{ext}")
            if "audio" in self.modalities:
                ext = self._member(fields, "audio", AUDIO_MEMBERS)
                if ext is None:
                    raise SkippedSample("missing_fields", f"{key}: no audio member")
                audio = decode_audio(self._read(path, fields[ext]), self.sample_rate, f"{key}.{ext}")
            extra: dict[str, Any] = {"wds": {"shard": str(path.relative_to(self._root)), "key": key}}
            if meta is not None:
                extra["meta"] = meta
            if "label" in self.field_map:
                label = self._text(path, fields, meta, "label", ())
                if label is None:
                    raise SkippedSample("missing_fields", f"{key}: no label ({self.field_map['label']})")
                extra["label"] = label.strip() if isinstance(label, str) else label
        return self.sample(c, caption, extra, image=image, audio=audio)
