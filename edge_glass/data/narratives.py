"""Localized Narratives as raw shards (`localized_narratives`): image, voice and caption that truly pair.

Why this source. Edge Glass aligns images, audio and text, and a tri-modal set is only useful if
the three say the same thing. In Localized Narratives (Pont-Tuset et al., ECCV 2020; Google,
CC BY 4.0) an annotator looked at one image and described it aloud while moving the mouse over
what they were talking about; the recording was kept (OGG), and the annotator then transcribed
it. So for every narrative:

    image    the picture the annotator was looking at (COCO, Open Images, Flickr30k, ADE20K)
    audio    that annotator's spoken description of it, as recorded
    caption  the manual transcription of that same recording

The audio is speech about the image, not the image's sound; that is the pairing this set offers
(and the one a Whisper encoder is built for). No mixing across sources is needed, unlike pairing
an image set with an unrelated sound set by label, which would be made up. One sample per
narrative; the splits are by image (`<dataset_id>/<image_id>`), so the several narratives some
images have never straddle train and test.

Where the data comes from. The annotations are Google's JSONL files (fields dataset_id, image_id,
annotator_id, caption, timed_caption, traces, voice_recording; documented on the project page),
not a hub repository. The default is the COCO val2017 file (8,573 narratives):

    https://storage.googleapis.com/localized-narratives/annotations/coco_val_localized_narratives.jsonl

It is downloaded once with http_fetch (timeouts, retries, `--mirror`) into
`<HF_DATASETS_CACHE>/edge_glass/localized_narratives/` and read with
`datasets.load_dataset("json", data_files=...)`; datasets' own URL loading would need requests and
aiohttp, which this project does not install. `--hf_path` takes a local copy instead (a .jsonl
file, a directory of them, or parquet), or other annotation file URLs (comma-separated; e.g. the
COCO train or Open Images files). Media URLs:

    voice  https://storage.googleapis.com/localized-narratives/voice-recordings/<voice_recording>
    image  COCO (dataset_id mscoco_<split>): http://images.cocodataset.org/<split>/<image_id:012d>.jpg
           Open Images (dataset_id open_images_*): https://s3.amazonaws.com/open-images-dataset/<split>/<image_id>.jpg
           an `image_url` column, when a local table has one, takes precedence
           Flickr30k and ADE20K images have no public per-image URL: those rows are skipped as
           `no_image_url` (a local table with an image_url column can supply them)

Both are fetched over HTTP (http_fetch.py; `--mirror` redirects a host to a local copy), the image
verified and kept as its JPEG bytes, the recording decoded, made mono and resampled to
`--sample_rate` (16 kHz default) and stored as FLAC. The word timings (`timed_caption`) go into
the sample's json; the mouse traces do not (they are large and no stage reads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from edge_glass.data.http_fetch import FetchFailed, FetchPolicy, fetch_to_file
from edge_glass.data.raw_shards import RawSample, SkippedSample
from edge_glass.data.hf_rows import (
    DEFAULT_FRACTIONS,
    DEFAULT_MIN_IMAGE_SIDE,
    DEFAULT_SAMPLE_RATE,
    Candidate,
    CandidateSource,
    column,
    decode_audio,
    describe_location,
    load_table,
    require_columns,
    text,
    verify_image,
)
from edge_glass.utils.errors import UserError

ANNOTATIONS = "https://storage.googleapis.com/localized-narratives/annotations/coco_val_localized_narratives.jsonl"
VOICE_BASE = "https://storage.googleapis.com/localized-narratives/voice-recordings/"
COCO_BASE = "http://images.cocodataset.org/"
OPEN_IMAGES_BASE = "https://s3.amazonaws.com/open-images-dataset/"


def image_url(row: dict) -> str | None:
    """Where a narrative's image can be downloaded, or None when its source publishes no URL."""
    explicit = text(row.get("image_url"))
    if explicit:
        return explicit
    dataset_id, image_id = text(row.get("dataset_id")), text(str(row.get("image_id") or ""))
    if not dataset_id or not image_id:
        return None
    if dataset_id.startswith("mscoco_"):
        split = dataset_id.split("_", 1)[1]  # train2017 / val2017
        return f"{COCO_BASE}{split}/{int(image_id):012d}.jpg" if image_id.isdigit() else None
    if dataset_id.startswith("open_images"):
        subset = next((s for s in ("train", "validation", "test") if s in dataset_id), None)
        return f"{OPEN_IMAGES_BASE}{subset}/{image_id}.jpg" if subset else None
    return None


class LocalizedNarrativesSource(CandidateSource):
    """One image, the annotator's recorded description of it, and its transcription per sample."""

    name = "localized_narratives"
    modalities = ("vision", "audio", "text")

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        hf_path: str | None = None,
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        fetch: FetchPolicy | None = None,
    ) -> None:
        super().__init__(num_samples, seed, fractions, fetch, min_image_side=min_image_side, sample_rate=sample_rate)
        what = "Localized Narratives annotations"
        if hf_path is None or hf_path.startswith(("http://", "https://")):
            urls = [u.strip() for u in (hf_path or ANNOTATIONS).split(",") if u.strip()]
            self.location = ",".join(urls)
            files = [str(self._annotation_file(u)) for u in urls]
            self.table = load_table("json", data_files=files, split="train", what=what)
        else:
            self.location = describe_location("", hf_path)
            self.table = load_table("json", local=hf_path, what=what, loose=True)
        require_columns(self.table, ["dataset_id", "image_id", "caption", "voice_recording"], f"{what} ({self.location})")
        # One sample per narrative (row), split by its image: several narratives of one image
        # are separate samples, but always in the same split.
        groups = [f"{d}/{i}" for d, i in zip(column(self.table, "dataset_id"), column(self.table, "image_id"))]
        chosen = self.pick(len(groups), f"{what} ({self.location})")
        self.set_candidates([(groups[r], {"row": r}) for r in chosen])

    def _annotation_file(self, url: str) -> Path:
        """The annotation file at `url`, downloaded once into the datasets cache."""
        import datasets

        name = url.rstrip("/").rsplit("/", 1)[-1] or "annotations.jsonl"
        path = Path(datasets.config.HF_DATASETS_CACHE) / "edge_glass" / "localized_narratives" / name
        if not path.is_file():
            try:
                fetch_to_file(url, path, self.fetch_policy)
            except FetchFailed as e:
                raise UserError(
                    f"cannot download the Localized Narratives annotations ({e.reason}: {e.detail}); "
                    f"download the file yourself and pass --hf_path FILE, or --mirror a reachable copy"
                ) from None
        return path

    def origin(self) -> dict:
        return {"annotations": self.location, "hf_rows": len(self.table)}

    def realize(self, c: Candidate) -> RawSample:
        index = c.data["row"]
        row = self.row(self.table, index)
        info: dict[str, Any] = {"row": index, "image": c.group}
        caption, voice = text(row.get("caption")), text(row.get("voice_recording"))
        if not caption or not voice:
            missing = [n for n, v in (("caption", caption), ("voice_recording", voice)) if not v]
            raise SkippedSample("missing_fields", f"row {index}: empty {', '.join(missing)}", **info)
        url = image_url(row)
        if url is None:
            raise SkippedSample("no_image_url", f"row {index}: {row.get('dataset_id')!r} images have no public URL", **info)
        with self.skip_info(**info, url=url):
            img = verify_image(self.get(url, "image"), self.min_image_side, f"image {url}")
        voice_url = voice if voice.startswith(("http://", "https://")) else VOICE_BASE + voice.lstrip("/")
        with self.skip_info(**info, url=voice_url):
            audio, rate = decode_audio(self.get(voice_url, "voice recording"), self.sample_rate, f"voice {voice_url}")
        timed = row.get("timed_caption")
        meta = {
            "hf_row": index,
            "dataset_id": text(row.get("dataset_id")),
            "image_id": str(row.get("image_id")),
            "annotator_id": row.get("annotator_id"),
            "image_url": url,
            "voice_url": voice_url,
            "caption_kind": "transcription",
            **({"timed_caption": timed} if isinstance(timed, list) else {}),
        }
        return self.sample(c, caption, meta, image=img, audio=(audio, rate))
