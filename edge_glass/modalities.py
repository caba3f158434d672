"""The one table of modalities and the pairs between them.

Every other place that needs "which modalities are there, in which order" reads this table: the
config's `enabled()` lists and cross-section rules, the encoders' raw inputs during extraction,
the contrastive pairs of the model and its retrieval metrics, and the instruction prompts. The
name is the same everywhere (`vision`, never `image`); only raw files keep their own file kinds
(a raw sample's `image` is a PNG or JPEG member of a tar shard).

A pair is written `<a>_<b>` (`vision_text`); `fused` stands for the embedding that model fusion
makes of vision and audio (`fused_text`). A new modality is one more `ModalitySpec` here, its
encoder and its raw field: docs/extending.md lists what else follows from the table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    """The name in configs, stores, batches and metrics."""
    raw_field: str
    """The field of a decoded raw sample its encoder reads."""
    encoder: str
    """"module:Class" of its frozen encoder (an `edge_glass.encoders.base.FrozenEncoder`)."""
    encoder_config: str
    """"module:Class" of the dataclass its `encoders.<name>` config section is checked against."""
    encoder_doc: str
    """What `encoders.<name>` is, for the config reference."""
    perceptual: bool = True
    """A perceptual input (a decoder prefix, paired with text); False for the caption text."""


MODALITIES: tuple[ModalitySpec, ...] = (
    ModalitySpec("vision", raw_field="image", encoder="edge_glass.encoders.clip_vision:ClipVisionEncoder",
                 encoder_config="edge_glass.config:VisionEncoderConfig",
                 encoder_doc="Frozen image encoder (CLIP); null for runs without images."),
    ModalitySpec("audio", raw_field="audio", encoder="edge_glass.encoders.whisper_audio:WhisperAudioEncoder",
                 encoder_config="edge_glass.config:AudioEncoderConfig",
                 encoder_doc="Frozen audio encoder (Whisper); null for runs without audio."),
    ModalitySpec("text", raw_field="caption", encoder="edge_glass.encoders.sbert_text:SentenceTransformerTextEncoder",
                 encoder_config="edge_glass.config:TextEncoderConfig",
                 encoder_doc="Frozen caption encoder (Sentence-BERT); null when no modality is aligned to text.",
                 perceptual=False),
)
"""In their fixed order: stores, tables and batches list modalities this way."""

NAMES: tuple[str, ...] = tuple(m.name for m in MODALITIES)
"""Every modality's name, in table order."""
PERCEPTUAL: tuple[str, ...] = tuple(m.name for m in MODALITIES if m.perceptual)
"""The modalities a decoder may read as a prefix."""
FUSION_INPUTS: tuple[str, str] = ("vision", "audio")
"""The two modalities `model.fusion` combines into one embedding."""
FUSED = "fused"
"""The name of the fused embedding in pairs (`fused_text`)."""
TEXT = "text"
"""The caption's modality: every perceptual one is aligned to it."""


def pair_names() -> list[str]:
    """Every contrastive pair, in a fixed order: each perceptual modality with text, each two
    perceptual modalities with each other, and the fused embedding with text."""
    pairs = [f"{m}_{TEXT}" for m in PERCEPTUAL]
    pairs += [f"{a}_{b}" for i, a in enumerate(PERCEPTUAL) for b in PERCEPTUAL[i + 1:]]
    return pairs + [f"{FUSED}_{TEXT}"]


def resolve(ref: str):
    """The object a "module:attribute" reference names."""
    import importlib

    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def spec(name: str) -> ModalitySpec:
    for m in MODALITIES:
        if m.name == name:
            return m
    raise KeyError(f"unknown modality {name!r}; known: {', '.join(NAMES)}")


def raw_field(name: str) -> str:
    """The raw sample field the modality's encoder reads (`vision` -> `image`)."""
    return spec(name).raw_field


def in_order(names) -> list[str]:
    """`names` in table order."""
    wanted = set(names)
    return [n for n in NAMES if n in wanted]


def pair_modalities(pair: str) -> tuple[str, str]:
    """The two sides of a pair name (`vision_text` -> (vision, text); `fused_text` -> (fused, text))."""
    a, sep, b = pair.partition("_")
    if not sep or "_" in b:
        raise ValueError(f"a pair name is <a>_<b>, got {pair!r}")
    return a, b


def pair_needs(pair: str) -> list[str]:
    """The modalities a pair's two embeddings are made from (`fused` needs every perceptual one)."""
    needs: list[str] = []
    for side in pair_modalities(pair):
        needs += list(FUSION_INPUTS) if side == FUSED else [side]
    return in_order(needs)
