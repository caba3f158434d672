"""Instruction examples from raw-sample metadata: a caption as a describe-it answer, and QA pairs.

    examples_from_meta(meta, caption)   -> [{prompt, answer, kind, attribute}, ...]

Each decoder turns these examples into its own inputs (`edge_glass.decoders`): the Qwen decoder
renders them with its chat template (`decoders/qwen_chat.py`), the TRM and the causal baseline
tokenise the plain prompt and a fixed-length answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from edge_glass.modalities import PERCEPTUAL

CAPTION_PROMPTS: dict[str, tuple[str, ...]] = {
    "vision": ("Describe the image.", "What is in the picture?", "Describe what you see."),
    "audio": ("Describe the sound.", "What do you hear in the audio?", "Describe what you hear."),
    "vision+audio": ("Describe what you see and hear.", "Describe the scene.", "What is happening here?"),
}
"""Caption-instruction templates per prefix modality set; one is chosen per sample, deterministically."""


# --------------------------------------------------------------------------------------------
# Examples from metadata
# --------------------------------------------------------------------------------------------


def _stable_index(key: str, n: int) -> int:
    """An index in [0, n) that depends only on `key` (not on PYTHONHASHSEED or the process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big") % n


def caption_prompt(sample_id: str, modalities: Sequence[str] = ("vision",)) -> str:
    """The caption instruction for one sample: a template picked by a hash of its id."""
    key = "+".join(m for m in PERCEPTUAL if m in modalities) or PERCEPTUAL[0]
    templates = CAPTION_PROMPTS[key]
    return templates[_stable_index(sample_id, len(templates))]


def examples_from_meta(
    meta: dict | str,
    caption: str,
    *,
    modalities: Sequence[str] = ("vision",),
    include_caption: bool = True,
    include_qa: bool = True,
) -> list[dict[str, Any]]:
    """Instruction examples of one raw sample: its caption as a describe-it answer, and every QA pair.

    `meta` is the raw sample's JSON (a dict, or the JSON text a `FeatureLoader(with_meta=True)`
    batch carries). QA pairs come from `meta["qa"]` (`[{attribute, question, answer}]`, as the
    synthetic set writes them) and from a top-level `question`/`answer` pair (single-QA sources).
    Each example is `{"prompt", "answer", "kind": "caption"|"qa", "attribute": str|None}`.
    The caption template depends only on the sample's id (or the caption when there is none).
    """
    if isinstance(meta, str):
        meta = json.loads(meta) if meta.strip() else {}
    examples: list[dict[str, Any]] = []
    caption = (caption or "").strip()
    # QA-only sources store their first QA pair as the sample's text (`caption_kind: "qa"`); it is
    # no description of the image, so it never becomes a describe-it example.
    if include_caption and caption and meta.get("caption_kind") != "qa":
        sample_id = str(meta.get("id") or meta.get("key") or caption)
        examples.append(
            {"prompt": caption_prompt(sample_id, modalities), "answer": caption, "kind": "caption", "attribute": None}
        )
    if include_qa:
        pairs = list(meta.get("qa") or [])
        if meta.get("question") and meta.get("answer"):
            pairs.append({"question": meta["question"], "answer": meta["answer"]})
        for qa in pairs:
            question, answer = str(qa.get("question", "")).strip(), str(qa.get("answer", "")).strip()
            if question and answer:
                examples.append({"prompt": question, "answer": answer, "kind": "qa", "attribute": qa.get("attribute")})
    return examples
