"""PixMo as raw shards: `pixmo_cap` (image + dense caption) and `pixmo_qa` (image + QA pairs).

Both are image + text sets (no audio); dataset.json says so. Images are URLs in every PixMo table
except pixmo-docs, whose images are embedded bytes; each URL is fetched (http_fetch.py), verified
and kept as its original JPEG/PNG bytes (hf_rows.verify_image). Rows whose image cannot be had
are skipped and counted, never fatal. Splits (default 70/15/15) come from a hash of (seed, image),
see hf_rows.py.

Columns read (checked against the dataset cards and allenai/molmo's PixMo loaders):

    allenai/pixmo-cap                     image_url, caption, transcripts (list; optional)
    allenai/pixmo-cap-qa                  image_url, question, answer; or image_url, messages
                                          (the question may hold earlier turns tagged [USER] /
                                          [ASSISTANT]; each turn pair becomes one QA pair)
    allenai/pixmo-ask-model-anything      image_url, image_sha256, question, answer
    allenai/pixmo-point-explanations      image_url, image_sha256, question, parsed_response
                                          (falling back to response)
    allenai/pixmo-count                   image_url, image_sha256, label, count
    allenai/pixmo-docs, config "charts"   image (embedded), image_id, questions {question[], answer[]}

Where a table has image_sha256, the downloaded bytes must match it (`hash_mismatch` otherwise:
the URL now serves another picture).

pixmo_qa groups rows by image, so one sample holds every selected QA pair about its image in
`json["qa"] = [{"attribute": <subset name>, "question", "answer"}]` (what the instruct stage reads,
see instruct.examples_from_meta). None of the QA tables has a caption, so the sample's caption
(.txt, which the align stage embeds) is its first QA pair as plain text, "<question> <answer>",
and `json["caption_kind"] = "qa"` marks it as such (`"caption"` for pixmo_cap). pixmo-count has
no question text; its pair is "How many <label> are there in the image?" / "<count>".

Per-subset sample counts (`--source_caps pixmo-docs=200,pixmo-count=0,...`): named subsets get
their cap, and the rest of `--num_samples` is shared equally by the subsets not named. A subset
with fewer images than its cap gives all it has (with a warning).

With `--hf_path DIR`, pixmo_cap reads DIR as the local copy of allenai/pixmo-cap, and pixmo_qa
reads DIR/<subset> (DIR/pixmo-cap-qa, DIR/pixmo-docs, ...) for each subset it needs, e.g. after
`huggingface-cli download allenai/pixmo-docs --repo-type dataset --local-dir DIR/pixmo-docs`.
Only subsets with a non-zero cap are loaded. The URL tables are small (tens to hundreds of MB),
but pixmo-docs' charts config embeds its images (about 25 GB), and `load_dataset` fetches a whole
split before reading a row: for a few hundred charts, download some of its parquet files
(`--include "charts/train-0000[0-1]*"`) and point `--hf_path` there.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edge_glass.data.http_fetch import FetchPolicy
from edge_glass.data.raw_shards import RawSample, SkippedSample
from edge_glass.data.hf_rows import (
    DEFAULT_FRACTIONS,
    DEFAULT_MIN_IMAGE_SIDE,
    Candidate,
    CandidateSource,
    column,
    describe_location,
    group_rows,
    load_table,
    media_bytes,
    require_columns,
    text,
    undecoded,
    verify_image,
)
from edge_glass.utils.errors import UserError

PIXMO_CAP = "allenai/pixmo-cap"


def _check_sha(data: bytes, expected: Any, url: str) -> None:
    expected = text(expected).lower()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise SkippedSample("hash_mismatch", f"image: {url} no longer serves the annotated image", url=url)


# ---------------------------------------------------------------------------------------------
# pixmo_cap


class PixmoCapSource(CandidateSource):
    """PixMo-Cap: one web image and its ~200-word dense caption per sample."""

    name = "pixmo_cap"
    modalities = ("vision", "text")

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        hf_path: str | None = None,
        hf_split: str = "train",
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        fetch: FetchPolicy | None = None,
    ) -> None:
        super().__init__(num_samples, seed, fractions, fetch, min_image_side=min_image_side)
        self.load_hub_table(PIXMO_CAP, hf_path, hf_split, "PixMo-Cap", ["image_url", "caption"])
        urls = column(self.table, "image_url")
        groups, rows = group_rows(url or f"row:{i}" for i, url in enumerate(urls))
        chosen = self.pick(len(groups), f"PixMo-Cap ({self.location})")
        self.set_candidates([(groups[g], {"row": rows[g][0]}) for g in chosen])

    def realize(self, c: Candidate) -> RawSample:
        index = c.data["row"]
        row = self.row(self.table, index)
        url, caption = text(row.get("image_url")), text(row.get("caption"))
        if not url or not caption:
            missing = [name for name, v in (("image_url", url), ("caption", caption)) if not v]
            raise SkippedSample("missing_fields", f"row {index}: empty {', '.join(missing)}", row=index)
        with self.skip_info(row=index, url=url):
            img = verify_image(self.get(url, "image"), self.min_image_side, f"image {url}")
        transcripts = [t for t in (row.get("transcripts") or []) if isinstance(t, str)]
        meta = {"hf_row": index, "image_url": url, "caption_kind": "caption", "transcripts": transcripts}
        return self.sample(c, caption, meta, image=img)


# ---------------------------------------------------------------------------------------------
# pixmo_qa: the QA subsets


_TURN = re.compile(r"\[(USER|ASSISTANT)\]")


def _turn_pairs(question: str, answer: str) -> list[tuple[str, str]]:
    """PixMo-CapQA folds a conversation into `question` ("[USER] q1 [ASSISTANT] a1 [USER] q2
    [ASSISTANT]") with the last answer in `answer`: every user turn followed by an assistant turn
    is a pair, and the last user turn pairs with `answer`. Untagged text is one plain question."""
    parts = _TURN.split(question)
    if len(parts) == 1:
        return [(question.strip(), answer.strip())]
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    pairs, pending = [], None
    for role, said in turns:
        if role == "USER":
            pending = said
        elif pending is not None and said:
            pairs.append((pending, said))
            pending = None
    if pending:
        pairs.append((pending, answer.strip()))
    return pairs


def _cap_qa(row: dict) -> list[tuple[str, str]]:
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        flat = [text(m) for m in messages]
        return list(zip(flat[0::2], flat[1::2]))
    return _turn_pairs(text(row.get("question")), text(row.get("answer")))


def _plain_qa(row: dict) -> list[tuple[str, str]]:
    return [(text(row.get("question")), text(row.get("answer")))]


def _point_explanation_qa(row: dict) -> list[tuple[str, str]]:
    answer = text(row.get("parsed_response")) or text(row.get("response"))
    return [(text(row.get("question")), answer)]


def _count_qa(row: dict) -> list[tuple[str, str]]:
    label, count = text(row.get("label")), row.get("count")
    if not label or count is None:
        return []
    return [(f"How many {label} are there in the image?", str(count))]


def _docs_qa(row: dict) -> list[tuple[str, str]]:
    qs = row.get("questions") or {}
    if isinstance(qs, dict):  # datasets' Sequence-of-struct: a dict of lists
        return [(text(q), text(a)) for q, a in zip(qs.get("question") or [], qs.get("answer") or [])]
    return [(text(q.get("question")), text(q.get("answer"))) for q in qs if isinstance(q, dict)]


@dataclass(frozen=True)
class QASubset:
    name: str
    hub_id: str
    config: str | None
    group_column: str  # rows with the same value share an image
    columns: tuple[str, ...]  # required
    pairs: Callable[[dict], list[tuple[str, str]]]
    embedded_image: str | None = None  # column with the image bytes (else image_url is fetched)
    any_of: tuple[tuple[str, ...], ...] = ()


QA_SUBSETS: tuple[QASubset, ...] = (
    QASubset("pixmo-cap-qa", "allenai/pixmo-cap-qa", None, "image_url", ("image_url",), _cap_qa,
             any_of=(("question", "messages"),)),
    QASubset("pixmo-ask-model-anything", "allenai/pixmo-ask-model-anything", None, "image_url",
             ("image_url", "question", "answer"), _plain_qa),
    QASubset("pixmo-point-explanations", "allenai/pixmo-point-explanations", None, "image_url",
             ("image_url", "question"), _point_explanation_qa, any_of=(("parsed_response", "response"),)),
    QASubset("pixmo-count", "allenai/pixmo-count", None, "image_url", ("image_url", "label", "count"), _count_qa),
    QASubset("pixmo-docs", "allenai/pixmo-docs", "charts", "image_id", ("image", "image_id", "questions"), _docs_qa,
             embedded_image="image"),
)
QA_NAMES = tuple(s.name for s in QA_SUBSETS)


def parse_source_caps(spec: str | dict | None) -> dict[str, int]:
    """`pixmo-docs=200,pixmo-count=0` (or a dict) -> {name: cap}; names are checked."""
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, dict) else (part.partition("=")[::2] for part in spec.split(","))
    caps: dict[str, int] = {}
    for name, value in items:
        name = str(name).strip()
        if name not in QA_NAMES:
            near = difflib.get_close_matches(name, QA_NAMES, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise UserError(f"--source_caps: unknown subset {name!r}{hint} (known: {', '.join(QA_NAMES)})")
        try:
            cap = int(str(value).strip())
        except ValueError:
            raise UserError(f"--source_caps: {name}={value!r} is not an integer") from None
        if cap < 0:
            raise UserError(f"--source_caps: {name}={cap} must be >= 0")
        caps[name] = cap
    return caps


def resolve_caps(num_samples: int, named: dict[str, int]) -> dict[str, int]:
    """Samples per subset: the named caps, and the rest of num_samples shared equally (earlier
    subsets get the remainder) by the subsets not named."""
    rest = [n for n in QA_NAMES if n not in named]
    left = num_samples - sum(named.values())
    if left < 0 or (not rest and left != 0):
        raise UserError(
            f"--source_caps add up to {sum(named.values())}, but --num_samples is {num_samples}"
            + ("" if rest else " (all subsets are named, so the two must agree)")
        )
    caps = dict(named)
    for i, n in enumerate(rest):
        caps[n] = left // len(rest) + (1 if i < left % len(rest) else 0)
    return {n: caps[n] for n in QA_NAMES}


class PixmoQASource(CandidateSource):
    """The PixMo QA mix: one image and its QA pairs per sample, from five subsets."""

    name = "pixmo_qa"
    modalities = ("vision", "text")

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        hf_path: str | None = None,
        hf_split: str = "train",
        source_caps: str | dict | None = None,
        min_image_side: int = DEFAULT_MIN_IMAGE_SIDE,
        fetch: FetchPolicy | None = None,
    ) -> None:
        super().__init__(num_samples, seed, fractions, fetch, min_image_side=min_image_side)
        self.hf_split = hf_split
        self.caps = resolve_caps(num_samples, parse_source_caps(source_caps))
        self.tables: dict[str, Any] = {}
        self.locations: dict[str, str] = {}
        items: list[tuple[str, dict]] = []
        for stream, subset in enumerate(QA_SUBSETS):
            cap = self.caps[subset.name]
            if cap == 0:
                continue
            local = None
            if hf_path is not None:
                local = Path(hf_path) / subset.name
                if not local.exists():
                    raise UserError(
                        f"--hf_path {hf_path}: no local copy of {subset.hub_id} at {local} "
                        f"(pixmo_qa reads <hf_path>/<subset>; or pass --source_caps {subset.name}=0)"
                    )
            what = f"PixMo QA subset {subset.name}"
            table = load_table(subset.hub_id, local=local, config=subset.config, split=hf_split, what=what)
            require_columns(table, subset.columns, what, subset.any_of)
            if subset.embedded_image:
                table = undecoded(table, subset.embedded_image)
            self.tables[subset.name] = table
            self.locations[subset.name] = describe_location(subset.hub_id, local)
            keys = column(table, subset.group_column)
            groups, rows = group_rows(k if k else f"row:{i}" for i, k in enumerate(keys))
            for g in self.pick(len(groups), what, cap, stream):
                # URL-keyed groups are split by the URL alone, so an image PixMo-Cap also has lands
                # in the same split in both sets (no train/test leak between them).
                group = groups[g] if subset.group_column == "image_url" else f"{subset.name}:{groups[g]}"
                items.append((group, {"subset": subset.name, "rows": rows[g]}))
        self.set_candidates(items)
        self._by_name = {s.name: s for s in QA_SUBSETS}

    def origin(self) -> dict:
        return {
            "hf_datasets": self.locations,
            "hf_split": self.hf_split,
            "hf_rows": {n: len(t) for n, t in self.tables.items()},
        }

    def choice_params(self) -> dict:
        return {"source_caps": self.caps}

    def realize(self, c: Candidate) -> RawSample:
        with self.skip_info(subset=c.data["subset"], rows=c.data["rows"]):
            return self._realize(c)

    def _realize(self, c: Candidate) -> RawSample:
        subset = self._by_name[c.data["subset"]]
        table = self.tables[subset.name]
        rows = [self.row(table, r) for r in c.data["rows"]]
        qa = [
            {"attribute": subset.name, "question": q, "answer": a}
            for row in rows
            for q, a in subset.pairs(row)
            if q and a
        ]
        if not qa:
            raise SkippedSample("missing_fields", f"{subset.name} rows {c.data['rows']}: no question with an answer")
        meta: dict[str, Any] = {"subset": subset.name, "hf_rows": c.data["rows"], "caption_kind": "qa", "qa": qa}
        if subset.embedded_image:
            data = media_bytes(rows[0].get(subset.embedded_image))
            if data is None:
                raise SkippedSample("missing_fields", f"{subset.name} row {c.data['rows'][0]}: no image bytes")
            img = verify_image(data, self.min_image_side, f"{subset.name} image {rows[0].get(subset.group_column)}")
            meta["image_id"] = text(rows[0].get(subset.group_column))
        else:
            url = text(rows[0].get("image_url"))
            if not url:
                raise SkippedSample("missing_fields", f"{subset.name} row {c.data['rows'][0]}: empty image_url")
            with self.skip_info(url=url):
                data = self.get(url, f"{subset.name} image")
                _check_sha(data, rows[0].get("image_sha256"), url)
                img = verify_image(data, self.min_image_side, f"{subset.name} image {url}")
            meta["image_url"] = url
        first = qa[0]
        return self.sample(c, f"{first['question']} {first['answer']}", meta, image=img)
