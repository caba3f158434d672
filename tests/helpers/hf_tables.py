"""Small local copies of the real sources' tables, with their real column names and feature types,
laid out as `huggingface-cli download` leaves a hub dataset (data/train-*.parquet, or a README with
configs for pixmo-docs), so the sources read them through the same `datasets.load_dataset` call a
hub id takes. Images and audio that are URLs in the real tables point at the test's MediaServer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import datasets
from datasets import Audio, Dataset, Features, Image, List, Value


def _write(rows: dict, features: Features, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def _media_table(rows: dict, features: Features, media: dict[str, type], path: Path) -> Path:
    """Write a table with Image/Audio columns without datasets' encoders (its audio encoder needs
    torchcodec): build the {"bytes", "path"} structs plainly, then cast them to the media features."""
    plain = Features({k: ({"bytes": Value("binary"), "path": Value("string")} if k in media else v)
                      for k, v in features.items()})
    ds = Dataset.from_dict(rows, features=plain).cast(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pixmo_cap(root: Path, urls: Sequence[str], captions: Sequence[str] | None = None) -> Path:
    """allenai/pixmo-cap: image_url, caption, transcripts."""
    n = len(urls)
    captions = captions if captions is not None else [f"A detailed caption of picture {i}." for i in range(n)]
    rows = {
        "image_url": list(urls),
        "caption": list(captions),
        "transcripts": [[f"transcript {i} a", f"transcript {i} b"] for i in range(n)],
    }
    features = Features({"image_url": Value("string"), "caption": Value("string"), "transcripts": List(Value("string"))})
    _write(rows, features, root / "data" / "train-00000-of-00001.parquet")
    return root


def pixmo_qa(root: Path, urls: Sequence[str], bodies: Sequence[bytes], chart_pngs: Sequence[bytes]) -> Path:
    """The five pixmo_qa subsets under root/<subset>, each with its real columns.

    `urls[i]` serves `bodies[i]` (used for the sha256 columns). Every URL-based subset gets rows
    about the first images; ask-model-anything has two rows for its first image (one sample, two
    QA pairs); pixmo-docs embeds `chart_pngs`."""
    s = Value("string")
    n = len(urls)
    _write(
        {"image_url": list(urls), "question": [f"[USER] What is shown in {i}? [ASSISTANT]" for i in range(n)],
         "answer": [f"Picture {i}." for i in range(n)]},
        Features({"image_url": s, "question": s, "answer": s}),
        root / "pixmo-cap-qa" / "data" / "train-00000-of-00001.parquet",
    )
    ama_urls = [urls[0], *urls]
    ama_sha = [sha256(bodies[0]), *(sha256(b) for b in bodies)]
    _write(
        {"image_url": ama_urls, "image_sha256": ama_sha,
         "question": [f"Ask {j}?" for j in range(len(ama_urls))], "answer": [f"Answer {j}." for j in range(len(ama_urls))]},
        Features({"image_url": s, "image_sha256": s, "question": s, "answer": s}),
        root / "pixmo-ask-model-anything" / "data" / "train-00000-of-00001.parquet",
    )
    _write(
        {"image_url": list(urls), "image_sha256": [sha256(b) for b in bodies],
         "question": [f"Point to thing {i}." for i in range(n)],
         "response": [f"<point x=\"1\" y=\"2\">thing {i}</point>" for i in range(n)],
         "parsed_response": [f"Here is thing {i}." for i in range(n)]},
        Features({"image_url": s, "image_sha256": s, "question": s, "response": s, "parsed_response": s}),
        root / "pixmo-point-explanations" / "data" / "train-00000-of-00001.parquet",
    )
    _write(
        {"image_url": list(urls), "image_sha256": [sha256(b) for b in bodies], "count": list(range(2, n + 2)),
         "points": [{"x": [1.0] * (i + 2), "y": [2.0] * (i + 2)} for i in range(n)], "label": ["dog"] * n},
        Features({"image_url": s, "image_sha256": s, "count": Value("int32"),
                  "points": {"x": List(Value("float32")), "y": List(Value("float32"))}, "label": s}),
        root / "pixmo-count" / "data" / "train-00000-of-00001.parquet",
    )
    m = len(chart_pngs)
    _media_table(
        {"image": [{"bytes": b, "path": None} for b in chart_pngs], "image_id": [f"chart-{i}" for i in range(m)],
         "questions": [{"question": [f"Chart {i} max?", f"Chart {i} min?"], "answer": [str(i + 5), str(i)]} for i in range(m)]},
        Features({"image": Image(), "image_id": s, "questions": {"question": List(s), "answer": List(s)}}),
        {"image": Image},
        root / "pixmo-docs" / "charts" / "train-00000-of-00001.parquet",
    )
    # The real repository declares its four configs in the README; load_dataset(dir, "charts") reads it.
    (root / "pixmo-docs" / "README.md").write_text(
        "---\nconfigs:\n- config_name: charts\n  data_files:\n  - split: train\n    path: charts/train-*\n---\n"
    )
    return root


def audiocaps(root: Path, clips: Sequence[bytes | None], captions_per_clip: Sequence[int]) -> Path:
    """jp1924/AudioCaps: audiocap_id, youtube_id, start_time, audio (Audio), caption; one row per caption."""
    rows: dict[str, list] = {"audiocap_id": [], "youtube_id": [], "start_time": [], "audio": [], "caption": []}
    next_id = 0
    for c, (clip, k) in enumerate(zip(clips, captions_per_clip)):
        for j in range(k):
            rows["audiocap_id"].append(next_id)
            rows["youtube_id"].append(f"yt{c:03d}")
            rows["start_time"].append(30)
            rows["audio"].append({"bytes": clip, "path": f"yt{c:03d}.flac" if clip is not None else None})
            rows["caption"].append(f"Clip {c} sounds like this, take {j}.")
            next_id += 1
    features = Features({"audiocap_id": Value("int32"), "youtube_id": Value("string"), "start_time": Value("int32"),
                         "audio": Audio(), "caption": Value("string")})
    _media_table(rows, features, {"audio": Audio}, root / "data" / "train-00000-of-00001.parquet")
    return root


def narratives(path: Path, entries: Sequence[dict]) -> Path:
    """Localized Narratives JSONL: dataset_id, image_id, annotator_id, caption, timed_caption,
    traces, voice_recording (fields as the project page documents them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            row = {
                "dataset_id": e.get("dataset_id", "mscoco_val2017"),
                "image_id": str(e["image_id"]),
                "annotator_id": e.get("annotator_id", 7),
                "caption": e.get("caption", f"In this image there is thing {e['image_id']}."),
                "timed_caption": [{"utterance": "In this", "start_time": 0.0, "end_time": 0.4}],
                "traces": [[{"x": 0.1, "y": 0.2, "t": 0.0}]],
                "voice_recording": e["voice_recording"],
            }
            f.write(json.dumps(row) + "\n")
    return path


def use_cache(tmp: Path) -> None:
    """Point datasets' Arrow cache at a test directory (in this process)."""
    datasets.config.HF_DATASETS_CACHE = Path(tmp)
