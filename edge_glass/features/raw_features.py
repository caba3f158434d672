"""Store-layout features of raw inputs outside extraction, by extraction's own code path.

Inference (a user's files) and zero-shot evaluation (class-name prompts) need what a store
holds for inputs that are in no store. They go through the same preprocessing
(`prepared_batches.prepare_batch`) and the same `extract.encode_batch` (float16 values, as a
float16 store holds them), then into the loader's padded layout, so their features equal the
store's for the same input. The encoder is rebuilt from the config and refused when it no
longer describes itself as the store's manifest recorded (weights hash, layer, preprocessing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_glass.config import Config
from edge_glass.encoders.base import FrozenEncoder, resolve_dtype
from edge_glass.features.extract import encode_batch
from edge_glass.features.manifest import encoder_fingerprint
from edge_glass.features.prepared_batches import prepare_batch
from edge_glass.features.sample_checks import raw_problem
from edge_glass.modalities import resolve, spec
from edge_glass.utils.errors import UserError


def checked_encoder(cfg: Config, manifest: dict, modality: str, device: torch.device) -> FrozenEncoder:
    """The frozen encoder of `modality` from the config, refused (both fingerprints named) when
    it computes other features than the store's manifest records."""
    sub = getattr(cfg.encoders, modality, None)
    if sub is None:
        raise UserError(f"encoders.{modality}: the config has no {modality} encoder")
    enc = resolve(spec(modality).encoder)(sub, device, resolve_dtype(sub.dtype, device))
    theirs = manifest["encoders"].get(modality)
    ours = json.loads(json.dumps(enc.describe()))  # as the manifest holds it (lists, not tuples)
    if theirs is None:
        raise UserError(f"encoders.{modality}: the store holds no {modality} features")
    if _identity(theirs) != _identity(ours):
        raise UserError(
            f"encoders.{modality}: {sub.model} now computes other features than the store was made with "
            f"(encoder fingerprint {encoder_fingerprint({modality: ours})}, store "
            f"{encoder_fingerprint({modality: theirs})}); use the encoder the store was extracted with"
        )
    return enc


_IGNORED = ("compute_dtype",)
"""Description keys that say how, not what, an encoder computes: a store extracted in bf16 on a
GPU is read by a model that runs its encoder in fp32 on a CPU (features equal within rounding)."""
_V1_DEFAULTS = {"pool": 1}
"""Keys a version-1 manifest did not record, and what they were then (no spatial pooling)."""


def _identity(description: dict) -> dict:
    """What must match between the store's encoder and the one rebuilt now."""
    return {**_V1_DEFAULTS, **{k: v for k, v in description.items() if k not in _IGNORED}}


def raw_sample(key: str, **fields) -> dict:
    """A decoded raw sample (the raw shards' layout) holding `fields`."""
    return {"key": key, "image": None, "audio": None, "sample_rate": None, "caption": "x", "json": {}, **fields}


def features_of(encoder: FrozenEncoder, modality: str, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Store-layout features (`tokens` [N, T, D] float16, `mask`, `pooled`) of decoded raw samples;
    a sample extraction would refuse is one line naming its key."""
    encoders = {modality: encoder}
    for s in samples:
        problem = raw_problem(s, encoders)
        if problem is not None:
            raise UserError(f"{s['key']}: {problem[1]}")
    stored = encode_batch(prepare_batch(samples, encoders, Path("<input>"), 0), encoders, "float16", "float16", None)
    if bool(stored.bad.any()):
        bad = [samples[i]["key"] for i in torch.nonzero(stored.bad).flatten().tolist()]
        raise UserError(f"{bad[0]}: the {modality} encoder's output is not finite")
    return padded(stored.tokens[modality], stored.lengths[modality], stored.pooled[modality])


def padded(rows: torch.Tensor, lengths, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat stored token rows -> the loader's padded layout (zeros past each length)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    t = int(lengths.max()) if len(lengths) else 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    tokens = torch.zeros((len(lengths), t, rows.shape[1]), dtype=rows.dtype)
    tokens[mask] = rows
    return {"tokens": tokens, "mask": mask, "pooled": pooled}
