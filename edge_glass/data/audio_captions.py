"""AudioCaps as raw shards (`audiocaps`): real sound clips with the captions people wrote for them.

An audio + text set (no images); dataset.json says so. The default table is the hub mirror
`jp1924/AudioCaps` (its card lists audiocap_id, youtube_id, start_time, audio, caption; splits
train/validation/test), read through `datasets.load_dataset`, with `--hf_split` choosing the table's
split (default train) before our own seeded 70/15/15 split. Any table with an Audio column and
captions works through `--hf_path`, e.g. a local Clotho copy:

    audio                     an Audio feature (read undecoded: {"bytes", "path"})
    caption | captions | caption_1..caption_5
                              one caption per row, a list per row, or Clotho's five columns
    youtube_id + start_time | audiocap_id | file_name | path of the audio
                              the clip's identity, first that exists

AudioCaps has one row per caption (five per clip in validation/test), so rows are grouped by clip:
one sample per clip, its first caption as the sample's caption (.txt) and all of them in
`json["captions"]`. The audio is decoded with libsndfile (FLAC, WAV, OGG, MP3), mixed to mono and
resampled with soxr to `--sample_rate` (default 16 kHz, what Whisper reads; 0 keeps each file's
rate), then stored as 16-bit FLAC. Clips that do not decode are skipped and counted.

The full AudioCaps mirror is hundreds of GB: `datasets.load_dataset` downloads a split's files
before reading any row, so for a few thousand clips point `--hf_path` at a partial local copy.
"""

from __future__ import annotations

from typing import Sequence

from edge_glass.data.http_fetch import FetchPolicy
from edge_glass.data.raw_shards import RawSample, SkippedSample
from edge_glass.data.hf_rows import (
    DEFAULT_FRACTIONS,
    DEFAULT_SAMPLE_RATE,
    Candidate,
    CandidateSource,
    column,
    decode_audio,
    group_rows,
    media_bytes,
    text,
    undecoded,
)

AUDIOCAPS = "jp1924/AudioCaps"
_CLOTHO_CAPTIONS = tuple(f"caption_{i}" for i in range(1, 6))


def _clip_ids(table) -> list[str]:
    names = set(table.column_names)
    if {"youtube_id", "start_time"} <= names:
        return [f"{y}@{t}" for y, t in zip(column(table, "youtube_id"), column(table, "start_time"))]
    for name in ("audiocap_id", "file_name", "file", "id"):
        if name in names:
            return [str(v) for v in column(table, name)]
    # Last resort: the audio's own file name (Audio cells read undecoded carry a path). Only the
    # path field is read, not the whole column, which would pull every clip's bytes into memory.
    import pyarrow.compute as pc

    paths = pc.struct_field(table.data.column("audio"), "path").to_pylist()
    return [str(p or f"row:{i}") for i, p in enumerate(paths)]


def _captions(row: dict) -> list[str]:
    if "caption" in row:
        found = [row.get("caption")]
    elif "captions" in row:
        found = list(row.get("captions") or [])
    else:
        found = [row.get(name) for name in _CLOTHO_CAPTIONS]
    return [t for t in (text(v) for v in found) if t]


class AudioCapsSource(CandidateSource):
    """One real clip and its human captions per sample."""

    name = "audiocaps"
    modalities = ("audio", "text")

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        hf_path: str | None = None,
        hf_split: str = "train",
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        fetch: FetchPolicy | None = None,
    ) -> None:
        super().__init__(num_samples, seed, fractions, fetch, sample_rate=sample_rate)
        table = self.load_hub_table(AUDIOCAPS, hf_path, hf_split, "audio-caption set", ["audio"],
                                    any_of=(("caption", "captions", *_CLOTHO_CAPTIONS),))
        self.table = undecoded(table, "audio")
        groups, rows = group_rows(_clip_ids(self.table))
        chosen = self.pick(len(groups), f"audio-caption set ({self.location})")
        self.set_candidates([(groups[g], {"rows": rows[g]}) for g in chosen])

    def realize(self, c: Candidate) -> RawSample:
        rows = [self.row(self.table, r) for r in c.data["rows"]]
        captions = list(dict.fromkeys(t for row in rows for t in _captions(row)))  # dedupe, keep order
        info = {"clip": c.group, "rows": c.data["rows"]}
        if not captions:
            raise SkippedSample("missing_fields", f"clip {c.group}: no caption", **info)
        # Every row of a clip holds the same clip; the first whose audio is there is used.
        data = next((d for d in (media_bytes(row.get("audio")) for row in rows) if d), None)
        if data is None:
            raise SkippedSample("missing_fields", f"clip {c.group}: no audio bytes", **info)
        with self.skip_info(**info):
            audio, rate = decode_audio(data, self.sample_rate, f"clip {c.group}")
        first = rows[0]
        extra = {k: first[k] for k in ("audiocap_id", "youtube_id", "start_time") if k in first}
        meta = {"clip": c.group, "hf_rows": c.data["rows"], "captions": captions, "caption_kind": "caption", **extra}
        return self.sample(c, captions[0], meta, audio=(audio, rate))
