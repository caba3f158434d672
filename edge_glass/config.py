"""The experiment schema: YAML in, validated and typed dataclasses out.

One dataclass per section, one docstring per field (the style of litgpt's argument dataclasses), so the schema is
also the reference documentation. Loading is strict on purpose: an unknown key is an error that
names its dotted path and the nearest valid key, a wrong type names the path, the expected and
the given type, and a missing required field is named. There are no aliases and nothing is
silently dropped: a key that is accepted is a key that is used.

    cfg = load_config("configs/cpu/quickstart.yaml", overrides=["optim.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")      # round-trips: load(save(cfg)) == cfg
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from edge_glass.modalities import MODALITIES, PERCEPTUAL, pair_names, pair_needs, resolve
from edge_glass.modalities import NAMES as MODALITY_NAMES
from edge_glass.modalities import FUSION_INPUTS
from edge_glass.utils.errors import UserError
from edge_glass.utils import shipped
from edge_glass.utils.io import write_text_atomic

DEFAULT_TEMPLATES = ("a photo of a {}.", "{}")
"""Zero-shot prompt templates when none are given (CLIP's simplest, and the bare class name)."""

Modality = Literal[MODALITY_NAMES]  # type: ignore[valid-type]  # the names in edge_glass/modalities.py
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(UserError):
    """A config that does not match the schema; the message names the dotted path."""


def _modality_fields(field_for):
    """Class decorator (under @dataclass): one optional field per modality of the table in
    edge_glass/modalities.py, before the class's own fields, so a new modality needs no edit
    here. `field_for(spec)` gives (type, docstring); the docstrings go to `__field_docs__`,
    the schema reference's source for generated fields."""

    def add(cls: type) -> type:
        own = dict(cls.__dict__.get("__annotations__", {}))
        generated: dict[str, Any] = {}
        docs: dict[str, str] = {}
        for spec in MODALITIES:
            tp, doc = field_for(spec)
            generated[spec.name] = tp | None
            docs[spec.name] = doc
            setattr(cls, spec.name, None)
        cls.__annotations__ = {**generated, **own}
        cls.__field_docs__ = docs
        return cls

    return add


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    name: str
    """Run name: letters, digits, '-', '_', '.' (a plain directory name). The run directory is
    `<output_dir>/<name>`."""
    seed: int = 0
    """Seed for model init, data order and every random choice of the run."""
    output_dir: str = "runs"
    """Parent directory of run directories (checkpoints, metrics.jsonl, config.yaml)."""

    def __post_init__(self) -> None:
        # A name with a separator or `..` would put the run (and its checkpoint pruning) outside
        # output_dir.
        if not plain_name(self.name):
            raise ConfigError(f"{{path}}.name: must be a plain directory name (letters, digits, '-', '_', '.'; not "
                              f"'.' or '..'), got {self.name!r}")


@dataclass
class SplitsConfig:
    train: str = "train"
    """Sub-directory (of both `raw_dir` and `features_dir`) holding the training split."""
    val: str = "val"
    """Split used for periodic evaluation and best-checkpoint selection."""
    test: str | None = "test"
    """Split reported by `scripts/evaluate.py`; null when the dataset has none."""


@dataclass
class DataConfig:
    raw_dir: str
    """Directory of raw WebDataset shards (`<raw_dir>/<split>/shard-NNNNNN.tar`)."""
    features_dir: str
    """Feature store written by `scripts/extract_features.py` and read by training."""
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    """Names of the train/val/test splits."""
    micro_batch_size: int = 64
    """Samples per rank per forward pass (DeepSpeed's `train_micro_batch_size_per_gpu`). In the
    instruct stage each sample gives one sequence per instruction example (decoder.instructions)."""
    eval_batch_size: int = 256
    """Samples per rank per forward pass during evaluation (no gradients, so it can be larger)."""
    prefetch_batches: int = 2
    """Batches the reader threads keep ready per rank (0: load inside the training loop, no
    threads). Threads, not worker processes: the loader's copies are `pread`s that release the
    GIL, and batches then need no pickling between processes."""
    reader_threads: int | None = None
    """Threads per rank that make batches (each a whole batch; order and content do not depend on
    the count, so a resumed run may use another). Null: the cores per rank (1 to 8)."""
    max_open_shards: int = 64
    """Most shard files a rank keeps open per split; the least recently used is closed when
    another is needed. The open-file limit (`ulimit -n`) must leave room for them. Of an HDF5
    split's, up to 8 are opened through HDF5 (~0.6 MB of library state each, for the strings),
    the rest are plain descriptors (token rows)."""
    verify: Literal["size", "sha256"] = "size"
    """Before step 1, check every shard of the train and val splits against the manifest: `size`
    (a stat each: catches truncated and replaced files) or `sha256` (reads every byte, split
    across ranks: also catches flipped bytes)."""
    release_pages: bool | None = None
    """Ask the OS to drop a block's bytes from the page cache once its batches are consumed.
    Null: only when the split is larger than half the machine's memory (a store that fits stays
    cached for the next epoch; one that does not would only push everything else out)."""
    store_format: Literal["hdf5", "webdataset"] = "hdf5"
    """Which backend of the feature store training reads (extraction may write both)."""
    read_block_size: int = 64
    """Consecutive samples the loader reads with one slice; the unit that is shuffled across ranks."""
    shuffle_window_blocks: int = 8
    """Blocks whose samples are shuffled together (memory: window x block x sample size)."""

    def __post_init__(self) -> None:
        _check_positive(self, "micro_batch_size", "eval_batch_size", "read_block_size", "shuffle_window_blocks",
                        "max_open_shards")
        if self.reader_threads is not None:
            _check_positive(self, "reader_threads")
        _check_non_negative(self, "prefetch_batches")


@dataclass
class VisionEncoderConfig:
    model: str
    """Hub id (`openai/clip-vit-large-patch14-336`) or local directory of a CLIP vision model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; null for the default branch or a local path."""
    layer: int = -2
    """Hidden layer whose patch tokens are stored; -2 is the penultimate layer, as LLaVA uses."""
    keep_cls: bool = False
    """Keep the CLS token at the front of the stored token sequence."""
    dtype: Dtype = "auto"
    """Compute dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    image_size: int | None = None
    """Resize/crop size fed to the encoder; null uses the image processor's own setting."""
    min_size: int = 8
    """Images whose shorter side has fewer pixels are bad samples (encoders.on_bad_sample)."""
    pool: int = 1
    """Average the patch grid over pool x pool windows before storing (2: a 24 x 24 grid of
    ViT-L/14-336 becomes 12 x 12, 4x fewer tokens, as LLaVA-NeXT / Qwen2-VL-style resamplers
    merge patches); 1 keeps every patch. The CLS token, when kept, is not pooled."""

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _check_positive(self, "image_size")
        _check_positive(self, "pool", "min_size")


@dataclass
class AudioEncoderConfig:
    model: str
    """Hub id (`openai/whisper-base`) or local directory of a Whisper model."""
    revision: str | None = None
    """Hub revision to pin; null for the default branch or a local path."""
    layer: int = -1
    """Encoder hidden layer whose frames are stored; -1 is the final (layer-normed) output."""
    dtype: Dtype = "auto"
    """Compute dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    audio_seconds: float = 30.0
    """Longest clip fed to the encoder; longer clips are cut. Frames are trimmed to true length."""
    min_seconds: float = 0.1
    """Clips shorter than this are bad samples (encoders.on_bad_sample): a one-sample clip would
    be encoded from padding."""

    def __post_init__(self) -> None:
        _check_positive(self, "audio_seconds")
        _check_non_negative(self, "min_seconds")


@dataclass
class TextEncoderConfig:
    model: str
    """Hub id (`sentence-transformers/all-mpnet-base-v2`) or local Sentence-BERT directory."""
    revision: str | None = None
    """Hub revision to pin; null for the default branch or a local path."""
    dtype: Dtype = "auto"
    """Compute dtype; `auto` is bfloat16 on GPU and float32 on CPU."""
    max_length: int | None = None
    """Token limit per caption; null uses the model's `max_seq_length`."""

    def __post_init__(self) -> None:
        if self.max_length is not None:
            _check_positive(self, "max_length")


@dataclass
@_modality_fields(lambda spec: (resolve(spec.encoder_config), spec.encoder_doc))
class EncodersConfig:
    # One field per modality (`vision`, `audio`, `text`, ...: its encoder's section) comes from
    # the modality table; the settings below are shared by every encoder.
    batch_size: int = 64
    """Samples per encoder forward pass during extraction."""
    num_workers: int | None = None
    """Processes per rank that read, decode and preprocess raw samples during extraction (0: the
    extracting process does it itself). Null: the cores per rank minus one, at most 8."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """A raw sample with NaN/inf audio, an empty caption, a clip shorter than audio.min_seconds or
    an image smaller than vision.min_size, or one whose encoder output is not finite: `error`
    stops extraction naming the shard and the key; `skip` leaves it out, counted by reason in
    the shard's record, the manifest (`skipped`) and the end-of-run summary."""

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size")
        if self.num_workers is not None:
            _check_non_negative(self, "num_workers")

    def enabled(self) -> list[str]:
        """Names of the modalities that have an encoder, in a fixed order."""
        return [m for m in MODALITY_NAMES if getattr(self, m, None) is not None]


@dataclass
class FeaturesConfig:
    token_dtype: Literal["float16", "float32", "int8", "int4"] = "float16"
    """How extraction stores token sequences. int8: one byte a value and one scale per token (half
    of float16); int4: NF4 codes, half a byte a value, one scale per 64 values (~3.8x smaller than
    float16). Both quantise per-dimension z-scored values; the model dequantises on its device.
    BENCHMARKS.md ("Compact token store") has what each costs in retrieval."""
    pooled_dtype: Literal["float16", "float32"] = "float16"
    """How extraction stores pooled vectors (one per sample: small next to the tokens)."""
    calibration_samples: int = 2048
    """int8/int4: samples (the first of the train split) whose statistics fix the z-score the codes
    are taken after; recorded in the manifest, shared by every split of the store."""

    def __post_init__(self) -> None:
        _check_positive(self, "calibration_samples")


@dataclass
class AdapterConfig:
    kind: Literal["mlp", "flat", "attn_pool", "perceiver"]
    """`mlp` projects the pooled vector; `flat` projects the whole token sequence flattened (keeps
    token positions; fixed-length tokens); `attn_pool` and `perceiver` pool the token sequence."""
    hidden_dim: int = 1024
    """Width of the MLP (the projector itself, or the head after pooling)."""
    num_layers: int = 2
    """Linear layers in the MLP (1 is a plain linear projection)."""
    dropout: float = 0.0
    """Dropout inside the adapter."""
    num_heads: int | None = None
    """Attention heads (attn_pool, perceiver only; default 8)."""
    num_latents: int | None = None
    """Learned latent queries (perceiver only; default 64)."""
    depth: int | None = None
    """Perceiver layers: cross-attention, latent self-attention, feed-forward (perceiver only; default 2)."""
    standardize: bool = True
    """Z-score inputs per dimension with the train split's statistics from the store manifest."""

    # Fields that only some kinds read, and their default when that kind is chosen.
    _KIND_FIELDS: typing.ClassVar[dict[str, tuple[tuple[str, ...], Any]]] = {
        "num_heads": (("attn_pool", "perceiver"), 8),
        "num_latents": (("perceiver",), 64),
        "depth": (("perceiver",), 2),
    }

    def __post_init__(self) -> None:
        for name, (kinds, default) in self._KIND_FIELDS.items():
            value = getattr(self, name)
            if value is not None and self.kind not in kinds:
                # Refuse rather than ignore: a user who sets num_latents on an mlp adapter
                # believes it does something.
                raise ConfigError(f"{{path}}.{name}: only used by kind {' or '.join(kinds)}, but kind is {self.kind!r}")
            if value is None and self.kind in kinds:
                setattr(self, name, default)
        _check_positive(self, "hidden_dim", "num_layers")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{{path}}.dropout: must be in [0, 1), got {self.dropout}")


@dataclass
@_modality_fields(lambda spec: (AdapterConfig, f"Adapter from {spec.name} features into the shared space; null for none."))
class AdaptersConfig:
    # One field per modality of the table (edge_glass/modalities.py).

    def enabled(self) -> list[str]:
        return [m for m in MODALITY_NAMES if getattr(self, m, None) is not None]


@dataclass
class ModelConfig:
    shared_dim: int = 512
    """Dimension D of the shared embedding space every adapter ends in."""
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    """One adapter per aligned modality."""
    mrl_dims: list[int] = field(default_factory=list)
    """Matryoshka prefix sizes, ascending; D is always added as the last. Empty: no MRL."""
    mrl_weights: list[float] | None = None
    """Loss weight per MRL dim (same length as the dims including D); null weighs them equally."""
    fusion: Literal["none", "concat", "cross_attention", "gated"] = "none"
    """How vision and audio combine into one embedding for tri-modal runs."""
    temperature_init: float = 0.07
    """Initial softmax temperature; the learned logit scale starts at ln(1/temperature_init)."""
    learn_temperature: bool = True
    """Learn the logit scale (clamped at `max_logit_scale`) instead of fixing it."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit scale), as in CLIP/OpenCLIP."""

    def __post_init__(self) -> None:
        _check_positive(self, "shared_dim", "temperature_init", "max_logit_scale")
        dims = self.mrl_dims
        if dims:
            if any(d <= 0 for d in dims) or dims != sorted(set(dims)):
                raise ConfigError(f"{{path}}.mrl_dims: must be positive and strictly ascending, got {dims}")
            if dims[-1] > self.shared_dim:
                raise ConfigError(f"{{path}}.mrl_dims: {dims[-1]} exceeds shared_dim {self.shared_dim}")
        if self.mrl_weights is not None and len(self.mrl_weights) != len(self.nested_dims()):
            raise ConfigError(
                f"{{path}}.mrl_weights: needs one weight per dim in {self.nested_dims()} "
                f"(mrl_dims plus shared_dim), got {len(self.mrl_weights)}"
            )

    def nested_dims(self) -> list[int]:
        """The MRL dims actually trained: `mrl_dims` plus the full `shared_dim`."""
        return sorted(set(self.mrl_dims) | {self.shared_dim})


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get LoRA adapters; `[all-linear]` alone puts them on every linear layer of
    the transformer (attention and MLP, not the output head), as QLoRA does."""

    def __post_init__(self) -> None:
        _check_positive(self, "r", "alpha")
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError("{path}.target_modules: all-linear already names every linear layer; give it alone")


@dataclass
class QwenConfig:
    model: str
    """Hub id (`Qwen/Qwen2.5-0.5B-Instruct`) or local directory of a Qwen2/2.5/3 causal LM."""
    revision: str | None = None
    """Hub revision to pin; null for the default branch or a local path."""
    tune: Literal["frozen", "full", "lora"] = "lora"
    """What of the LM trains: nothing, everything, or LoRA adapters."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (used when tune is lora)."""
    quantize: Literal["none", "8bit", "4bit"] = "none"
    """Load the frozen base in 8/4 bit (needs bitsandbytes and a GPU)."""
    max_length: int = 512
    """Longest tokenised prompt + answer; longer samples are cut before the answer, never inside it."""
    enable_thinking: bool | None = None
    """Passed to the chat template as `enable_thinking` (Qwen3: false renders the empty think block
    the model expects when it answers directly); null passes nothing (Qwen2/2.5 templates)."""
    loss_chunk_rows: int | None = 1024
    """The LM loss reads only the supervised (answer) positions and computes their logits this
    many rows at a time (decoders/chunked_ce.py): no [batch, length, vocabulary] logits, none for
    the prompt. Null: the plain path, Hugging Face's loss over every position's logits. The loss
    and its gradients are the same either way."""
    packing: bool = False
    """Pack several examples into each row of up to max_length tokens (decoders/packing.py)
    instead of padding every example to the batch's longest: no compute on padding, the same
    per-example losses. Position ids restart at each example and attention stays inside it."""
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel (transformers' attn_implementation): sdpa (torch's fused kernels), eager
    (plain products, the reference), flash_attention_2 (the flash-attn package on a CUDA GPU;
    packed rows then run its variable-length kernel instead of a block mask)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them: about a
    third more compute for far less activation memory, so a larger micro-batch fits (1.5B+)."""
    compile: bool = False
    """torch.compile each decoder layer (per block, as torchtitan does): fused element-wise work
    and fewer kernel launches; the first steps pay for the compilation."""

    def __post_init__(self) -> None:
        if self.loss_chunk_rows is not None:
            _check_positive(self, "loss_chunk_rows")


@dataclass
class TRMConfig:
    tokenizer: str
    """Tokenizer (hub id or local directory) whose vocabulary the TRM predicts."""
    hidden_dim: int = 256
    """Width of the tiny network."""
    num_layers: int = 2
    """Transformer blocks in the tiny network."""
    num_heads: int = 4
    """Attention heads."""
    h_cycles: int = 3
    """Outer cycles per supervision step (the first h_cycles-1 run without gradient)."""
    l_cycles: int = 6
    """Latent updates z <- f(x, y, z) per outer cycle."""
    n_sup: int = 16
    """Deep-supervision steps; the carry is detached between them."""
    max_answer_len: int = 16
    """Fixed answer length the TRM predicts in parallel (padded)."""
    halting: bool = True
    """Train a halting head and use it to stop early at inference."""
    recursive: bool = True
    """False trains the same network (tokenizer, width, layers, heads, max_answer_len) as a plain
    causal decoder, the baseline the TRM is compared with; h_cycles, l_cycles, n_sup and halting
    must then stay at their defaults."""

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_dim", "num_layers", "num_heads", "h_cycles", "l_cycles", "n_sup", "max_answer_len")
        if not self.recursive:
            for f in dataclasses.fields(self):
                if f.name in ("h_cycles", "l_cycles", "n_sup", "halting") and getattr(self, f.name) != f.default:
                    raise ConfigError(f"{{path}}.{f.name}: unused when recursive is false (the causal baseline)")


@dataclass
class DecoderConfig:
    kind: str = "none"
    """Which language decoder the instruct stage trains: `qwen`, `trm`, or a kind registered with
    `edge_glass.decoders.registry.register_decoder`; `none` for the align stage."""
    qwen: QwenConfig | None = None
    """Qwen settings; required when kind is qwen."""
    trm: TRMConfig | None = None
    """TRM settings; required when kind is trm."""
    prefix_modalities: list[Modality] = field(default_factory=lambda: ["vision"])
    """Modalities whose aligned features become prefix tokens for the decoder."""
    num_prefix_tokens: int = 4
    """Soft tokens per modality produced by the connector."""
    connector: Literal["linear", "mlp"] = "mlp"
    """Connector from aligned features to decoder-width prefix tokens."""
    connector_input: Literal["pooled", "tokens"] = "pooled"
    """`pooled`: the aligned embedding -> num_prefix_tokens soft tokens (one map). `tokens`: the
    Perceiver's resampled latents, mapped one by one (LLaVA's projector); needs a perceiver
    adapter with num_latents == num_prefix_tokens on every prefix modality."""
    connector_hidden_dim: int | None = None
    """Hidden width of the mlp connector; null uses the larger of its input and the decoder's width."""
    instructions: list[Literal["caption", "qa"]] = field(default_factory=lambda: ["caption", "qa"])
    """Which examples each sample gives: its caption as a describe-it answer, and its QA pairs."""
    system_prompt: str | None = None
    """System message rendered before the user turn (Qwen); null renders none, or the template's default."""
    options: dict[str, Any] | None = None
    """Settings of a plug-in decoder kind (one registered with an options class); the built-in
    kinds read their own sections (`qwen`, `trm`) instead."""

    def __post_init__(self) -> None:
        _check_positive(self, "num_prefix_tokens")
        if self.connector_hidden_dim is not None:
            _check_positive(self, "connector_hidden_dim")
        if not self.instructions:
            raise ConfigError("{path}.instructions: need at least one of 'caption', 'qa'")
        if not self.prefix_modalities or any(m not in PERCEPTUAL for m in self.prefix_modalities):
            raise ConfigError(f"{{path}}.prefix_modalities: need some of {', '.join(PERCEPTUAL)}, got {self.prefix_modalities}")
        self._check_kind()

    def _check_kind(self) -> None:
        # The registry says which kinds exist and where each reads its settings, so a plug-in
        # decoder is checked exactly like a built-in one. Imported here: it imports this module.
        from edge_glass.decoders.registry import DECODERS, decoder_entry

        entry = None
        if self.kind != "none":
            try:
                entry = decoder_entry(self.kind)
            except UserError as e:
                raise ConfigError(f"{{path}}.kind: {e}") from None
        for kind, other in DECODERS.items():
            if other.section is None:
                continue
            section = getattr(self, other.section)
            if self.kind == kind and section is None:
                raise ConfigError(f"{{path}}.{other.section}: required when decoder.kind is {kind!r}")
            if self.kind != kind and section is not None:
                raise ConfigError(f"{{path}}.{other.section}: given, but decoder.kind is {self.kind!r}")
        takes_options = entry is not None and entry.section is None and entry.options is not None
        if self.options is not None and not takes_options:
            raise ConfigError(f"{{path}}.options: given, but decoder kind {self.kind!r} takes no options")
        if takes_options:
            parse_section(entry.options, self.options or {}, "{path}.options")
        if self.system_prompt is not None and (entry is None or not entry.chat_template):
            raise ConfigError(f"{{path}}.system_prompt: the {self.kind!r} decoder renders no chat template")


def _pair_doc(pair: str) -> str:
    a, b = pair.split("_")
    what = "fused(vision, audio)" if a == "fused" else a
    return f"Weight of the {what}-{b} InfoNCE term" + ("; needs model.fusion." if a == "fused" else ".")


def _pair_fields(cls: type) -> type:
    """Class decorator (under @dataclass): one float weight per pair of `modalities.pair_names()`."""
    cls.__annotations__ = {pair: float for pair in pair_names()}
    cls.__field_docs__ = {pair: _pair_doc(pair) for pair in pair_names()}
    for pair in pair_names():
        setattr(cls, pair, 0.0)
    return cls


@dataclass
@_pair_fields
class PairWeightsConfig:
    # One weight per contrastive pair (`vision_text`, `audio_text`, `vision_audio`, `fused_text`,
    # ...), from the modality table.

    def active(self) -> dict[str, float]:
        """Pairs with a non-zero weight."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v != 0.0}


@dataclass
class LossConfig:
    pairs: PairWeightsConfig = field(default_factory=PairWeightsConfig)
    """Contrastive pair weights (align stage)."""
    mrl: bool = True
    """Apply the contrastive loss at every MRL dim (weighted by model.mrl_weights)."""
    lm_weight: float = 1.0
    """Weight of the language-model loss (instruct stage)."""
    label_smoothing: float = 0.0
    """Label smoothing of the contrastive cross-entropy."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr, in optimizer steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr: float = 0.0
    """Floor of the decay."""

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{{path}}.betas: need two values in [0, 1), got {self.betas}")
        _check_positive(self, "lr")
        _check_non_negative(self, "warmup_steps", "min_lr", "weight_decay")
        if self.min_lr > self.lr:
            raise ConfigError(f"{{path}}.min_lr: {self.min_lr} is above lr {self.lr}")


@dataclass
class TrainConfig:
    stage: Literal["align", "instruct"] = "align"
    """`align` trains adapters contrastively; `instruct` trains a decoder on aligned features."""
    epochs: int | None = None
    """Passes over the train split; set exactly one of epochs and max_steps."""
    max_steps: int | None = None
    """Optimizer steps to run; set exactly one of epochs and max_steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (DeepSpeed's `gradient_accumulation_steps`)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; `auto` is bf16 on GPUs that support it and fp32 on CPU."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    eval_interval: int = 500
    """Optimizer steps between evaluations (and at the end)."""
    save_interval: int = 500
    """Optimizer steps between checkpoints (and at the end)."""
    keep_last: int = 2
    """Newest checkpoints kept; the best-metric checkpoint is kept besides."""
    log_interval: int = 10
    """Optimizer steps between lines in metrics.jsonl."""
    deepspeed: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its "auto" fields are filled from this config."""
    monitor: list[Literal["csv", "tensorboard", "wandb"]] = field(default_factory=lambda: ["csv"])
    """Tracking backends that receive every metrics.jsonl record, with the optimizer step as the
    step (DeepSpeed's monitors): CSV and TensorBoard under `<run>/monitor/`, W&B in project
    `wandb_project` (`WANDB_MODE=offline` writes it under `<run>/monitor/wandb`, no network)."""
    wandb_project: str = "edge-glass"
    """W&B project of the run when `monitor` has wandb."""
    progress_seconds: float = 30.0
    """When the progress goes to a file rather than a terminal (SLURM, nohup), a plain progress
    line (step, loss, samples/s, ETA) every this many seconds, instead of a bar."""
    init_from: str | None = None
    """Align run directory whose adapters the instruct stage starts from."""
    freeze_adapters: bool = True
    """Keep the aligned adapters frozen in the instruct stage."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss: `stop` ends the run with one line naming the step and the last good
    checkpoint (nothing non-finite is ever saved); `skip` leaves out that optimizer step (DeepSpeed's
    ZeRO optimizers skip steps with non-finite gradients, as fp16 loss scaling does) and counts it
    as `skipped_nonfinite` in metrics.jsonl."""

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.max_steps is None):
            raise ConfigError(
                f"{{path}}: set exactly one of epochs and max_steps (got epochs={self.epochs}, max_steps={self.max_steps})"
            )
        for name in ("epochs", "max_steps"):
            if getattr(self, name) is not None:
                _check_positive(self, name)
        _check_positive(self, "grad_accum", "eval_interval", "save_interval", "keep_last", "log_interval", "progress_seconds")
        _check_non_negative(self, "grad_clip")


@dataclass
class EvalConfig:
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """K values of Recall@K."""
    chunk_size: int = 4096
    """Query rows scored at once, so an N x N similarity matrix never materialises."""
    max_new_tokens: int = 32
    """Generation limit for QA evaluation."""
    num_samples_to_log: int = 16
    """Generations written to the run directory for inspection."""
    max_samples: int | None = None
    """Instruct stage: evaluate generation on at most this many samples of the split (null: all)."""
    label_field: str | None = "label"
    """Field of a raw sample's JSON naming its class or group (a dotted path reaches into nested
    objects: `attributes.colour`): samples with equal values are
    positives of each other, and retrieval is also reported multi-positive (`group_R@K`: any
    sample of the query's group counts, as COCO/Flickr30k count any of an image's captions).
    Splits whose samples lack it get the strict one-to-one numbers only. Null: never."""
    zero_shot_classes: list[str] = field(default_factory=list)
    """Align stage: class names for zero-shot classification of each perceptual modality against
    text prompts (`zero_shot/<modality>/top1`, `top5`); a sample's class is its `label_field`.
    Empty: no zero-shot evaluation."""
    zero_shot_templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Prompt templates, `{}` where the class name goes; a class is the mean of its prompts."""
    best_metric: Literal["R@1", "group_R@1", "zero_shot"] = "R@1"
    """Align stage: the validation metric that picks the best checkpoint: R@1 or group_R@1
    averaged over pairs at the full dimension (group_R@1 needs samples with `label_field`), or
    zero-shot top-1 accuracy averaged over modalities (needs `zero_shot_classes`)."""

    def __post_init__(self) -> None:
        if not self.recall_ks or any(k <= 0 for k in self.recall_ks):
            raise ConfigError(f"{{path}}.recall_ks: need positive integers, got {self.recall_ks}")
        _check_positive(self, "chunk_size", "max_new_tokens")
        _check_non_negative(self, "num_samples_to_log")
        if self.best_metric in ("group_R@1", "zero_shot") and self.label_field is None:
            raise ConfigError(f"{{path}}.best_metric: {self.best_metric} needs eval.label_field (the samples' label)")
        if self.best_metric == "zero_shot" and not self.zero_shot_classes:
            raise ConfigError("{path}.best_metric: zero_shot needs eval.zero_shot_classes")
        if self.zero_shot_classes and (not self.zero_shot_templates or any("{}" not in t for t in self.zero_shot_templates)):
            raise ConfigError(f"{{path}}.zero_shot_templates: each needs '{{}}' for the class name, got {self.zero_shot_templates}")
        if self.max_samples is not None:
            _check_positive(self, "max_samples")


@dataclass
class SweepVariant:
    name: str
    """Variant name; its run is `<output_dir>/<experiment.name>-<name>`."""
    set: list[str] = field(default_factory=list)
    """`KEY=VALUE` overrides (as `--set` takes them) that make this variant from the base config."""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{{path}}.name: use letters, digits, '-', '_' or '.', got {self.name!r}")
        for item in self.set:
            if "=" not in item or item.split("=", 1)[0].strip().startswith(("sweep", "experiment.name")):
                raise ConfigError(f"{{path}}.set: {item!r} must be KEY=VALUE and may not change sweep or experiment.name")


@dataclass
class SweepConfig:
    variants: list[SweepVariant]
    """Runs of the ablation: each is this config with its overrides; `scripts/sweep.py` trains
    them in turn and reports them as one table."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"{{path}}.variants: need at least two variants with distinct names, got {names}")


@dataclass
class Config:
    experiment: ExperimentConfig
    """Name, seed and output directory of the run."""
    data: DataConfig
    """Where raw shards and features live, and how they are batched."""
    train: TrainConfig
    """Stage, length, precision, checkpointing and the DeepSpeed config."""
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    """Frozen encoders run once by `scripts/extract_features.py`."""
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    """How the feature store holds what the encoders compute."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Trainable adapters, the shared space and MRL."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Language decoder for the instruct stage."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""
    sweep: SweepConfig | None = None
    """An ablation over variants of this config, run by `scripts/sweep.py` (train.py refuses it)."""

    def __post_init__(self) -> None:
        # Cross-section rules: each names the field a user has to change.
        for modality in self.model.adapters.enabled():
            if getattr(self.encoders, modality) is None:
                raise ConfigError(f"model.adapters.{modality}: needs encoders.{modality} (its features come from there)")
        for pair, weight in self.loss.pairs.active().items():
            for modality in pair_needs(pair):
                if getattr(self.model.adapters, modality) is None:
                    raise ConfigError(f"loss.pairs.{pair}: weight {weight} needs model.adapters.{modality}")
            if pair == "fused_text" and self.model.fusion == "none":
                raise ConfigError(f"loss.pairs.fused_text: weight {weight} needs model.fusion (concat, cross_attention or gated)")
        if self.model.fusion != "none":
            for modality in FUSION_INPUTS:
                if getattr(self.model.adapters, modality) is None:
                    raise ConfigError(f"model.fusion: {self.model.fusion!r} fuses {' and '.join(FUSION_INPUTS)}, "
                                      f"and needs model.adapters.{modality}")
        if self.train.stage == "align" and not self.loss.pairs.active():
            raise ConfigError("loss.pairs: train.stage is 'align', which needs at least one pair with a non-zero weight")
        if self.train.stage == "instruct":
            self._check_instruct()
        if self.sweep is not None:
            self._check_sweep()

    def _check_sweep(self) -> None:
        # Every variant must be a valid config on its own, so a typo in one fails at load time,
        # not hours into the sweep.
        for i, variant in enumerate(self.sweep.variants):
            try:
                self.variant(variant)
            except ConfigError as e:
                raise ConfigError(f"sweep.variants[{i}] ({variant.name}): {e}") from None

    def variant(self, variant: "SweepVariant") -> "Config":
        """The run config of one sweep variant: this config, its overrides, no sweep section,
        and the name `<experiment.name>-<variant.name>`."""
        base = config_to_dict(self)
        base["sweep"] = None
        return config_from_dict(apply_overrides(base, [*variant.set, f"experiment.name={self.experiment.name}-{variant.name}"]))

    def _check_instruct(self) -> None:
        if self.decoder.kind == "none":
            from edge_glass.decoders.registry import DECODERS

            raise ConfigError(f"decoder.kind: train.stage is 'instruct', which needs a decoder ({' or '.join(DECODERS)})")
        if self.loss.pairs.active():
            raise ConfigError(
                "loss.pairs: train.stage is 'instruct', which trains on the language-model loss alone; "
                "set the pair weights to 0 (they belong to the align run in train.init_from)"
            )
        for modality in self.decoder.prefix_modalities:
            adapter = getattr(self.model.adapters, modality)
            if adapter is None:
                raise ConfigError(f"decoder.prefix_modalities: {modality!r} needs model.adapters.{modality}")
            if self.decoder.connector_input == "tokens":
                if adapter.kind != "perceiver":
                    raise ConfigError(
                        f"decoder.connector_input: 'tokens' reads the Perceiver's resampled latents, but "
                        f"model.adapters.{modality}.kind is {adapter.kind!r}; use 'pooled' or a perceiver adapter"
                    )
                if adapter.num_latents != self.decoder.num_prefix_tokens:
                    raise ConfigError(
                        f"decoder.num_prefix_tokens: {self.decoder.num_prefix_tokens} must equal "
                        f"model.adapters.{modality}.num_latents ({adapter.num_latents}) with connector_input 'tokens'"
                    )


# --------------------------------------------------------------------------------------------
# Loading, validation, overrides and saving
# --------------------------------------------------------------------------------------------


def plain_name(name: str) -> bool:
    """A file or directory name that stays inside its parent: no separator, not `.` or `..`."""
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "-_." for c in name)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{{path}}.{name}: must be > 0, got {getattr(obj, name)}")


def _check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{{path}}.{name}: must be >= 0, got {getattr(obj, name)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(tp, str(tp))


def _given(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _nearest(name: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if match:
        return f"; did you mean {match[0]!r}?"
    return f"; valid keys: {', '.join(candidates)}"


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], path)
        raise TypeError(f"unsupported union {tp}")  # schema bug, not a user error
    if value is None:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got null")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}{extra}")
        return value
    if origin is dict:
        # Free-form only where a registered class checks the contents (decoder.options).
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping, got {_given(value)}")
        return dict(value)
    if origin is dict:
        # Free-form only where a registered class checks the contents (decoder.options).
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping, got {_given(value)}")
        return dict(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_given(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {_given(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_given(value)}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected float, got {_given(value)}")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string; every user
            # writes learning rates that way, so a numeric string is taken as the float it is.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected float, got {_given(value)}") from None
        if not isinstance(value, float):
            raise ConfigError(f"{path}: expected float, got {_given(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {_given(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")  # schema bug, not a user error


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, strictly; errors carry the dotted `path`."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_given(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key{_nearest(str(key), list(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: missing required field ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ messages say `{path}` so they can be written without knowing where the
        # section sits in the tree; fill it in here.
        # In one pass: `path` may itself hold "{path}" (a plug-in's options checked from inside
        # DecoderConfig), which a second replace would fill in twice.
        message = re.sub(r"\{path\}(\.)?", lambda m: prefix if m.group(1) else where, str(e))
        raise ConfigError(message) from None


def parse_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping as strictly as a config section (a plug-in's options)."""
    return _build(cls, data, path)


def config_from_dict(data: Any) -> Config:
    """Validate a plain mapping (parsed YAML) into a `Config`."""
    return _build(Config, data, "")


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of a config (every field, defaults included)."""
    return dataclasses.asdict(cfg)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}:{where}: YAML syntax error: {problem}") from None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `KEY=VALUE` overrides (dotted keys, YAML values) to a raw config mapping.

    Overrides are applied before validation, so they are checked exactly like the file:
    `--set optim.lrr=1` fails with the same "did you mean 'lr'" as a typo in the YAML.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
        value = _parse_yaml(raw, f"--set {key}")
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML experiment file, apply `--set` overrides, and validate. A relative
    `configs/...` path that is not in the current directory is the package's shipped config."""
    path = shipped.resolve(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_given(data)}")
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: Config) -> str:
    """YAML text of the fully resolved config (defaults written out)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically; `load_config(path) == cfg` holds afterwards."""
    write_text_atomic(path, dump_config(cfg))


def config_fingerprint(cfg: Config) -> str:
    """Stable short hash of the resolved config, for refusing mismatched resumes."""
    canonical = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def looks_like_local_path(model: str) -> bool:
    """True when a model string is a filesystem path rather than a hub id.

    Hub ids are `name` or `org/name`; anything with two or more slashes, or starting with
    `.`, `/` or `~`, can only be a path, so a missing one is reported as a missing directory
    instead of a confusing hub lookup failure.
    """
    return model.startswith((".", "/", "~")) or model.count("/") >= 2


def check_files(cfg: Config) -> None:
    """Refuse, with one line each, files and directories the config names that do not exist."""
    ds = shipped.resolve(cfg.train.deepspeed)
    if not ds.is_file():
        raise ConfigError(f"train.deepspeed: file not found: {ds} (the shipped ones are in ds_configs/)")
    named = [(f"encoders.{m}.model", getattr(cfg.encoders, m).model) for m in cfg.encoders.enabled()]
    if cfg.decoder.qwen is not None:
        named.append(("decoder.qwen.model", cfg.decoder.qwen.model))
    if cfg.decoder.trm is not None:
        named.append(("decoder.trm.tokenizer", cfg.decoder.trm.tokenizer))
    for where, model in named:
        check_model_dir(model, where)


def check_model_dir(model: str, where: str) -> None:
    """A local model path that does not exist gets one clear line instead of a hub lookup error."""
    if looks_like_local_path(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(
            f"{where}: model directory not found: {model} "
            "(make the local set with: python scripts/make_local_models.py --out models/local)"
        )
