"""Tiny random-weight models with the real architectures, saved like hub checkpoints.

Each builder writes one directory that the ordinary hub loading code reads unchanged
(`AutoModel*.from_pretrained`, `AutoImageProcessor`, `AutoFeatureExtractor`, `AutoTokenizer`,
`SentenceTransformer(path)`), so the pipeline runs end to end on a CPU without a download. The
sizes are the smallest that keep each architecture's shape logic meaningful; each builds in well
under a second.

Weights are drawn inside `torch.random.fork_rng` after `torch.manual_seed(seed)`: the same
seed gives bit-identical weights whatever was built before, and the caller's RNG is untouched.
"""

from __future__ import annotations

import re
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GenerationConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from edge_glass.data.synthetic_attributes import text_corpus
from edge_glass.local_models.tokenizer import ENDOFTEXT, IM_END, train_bpe_tokenizer

QWEN_VOCAB_SIZE = 512
"""Upper bound for the trained BPE; the synthetic corpus runs out of merges a little below it."""

# Generic instruction-tuning phrasing, so prompts around the synthetic answers (and the
# ChatML role names) are a few tokens each rather than spelled out byte by byte.
CHAT_TEXTS: tuple[str, ...] = (
    "system", "user", "assistant",
    "You are a helpful assistant.",
    "Hello! How can I help you today?",
    "Describe the image.", "Describe the sound.", "Describe what you see and hear.",
    "What is in the picture?", "What do you hear in the audio?",
    "Answer with one word.", "Answer in a few words.",
    "Yes.", "No.", "I don't know.", "Thank you.",
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_clip_vision_tiny(out_dir: Path, seed: int) -> CLIPVisionModelWithProjection:
    """CLIP ViT image tower with projection (32x32 images, 16 patches, 64-d embeddings)."""
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    with _seeded(seed):
        model = CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(out_dir)
    # transformers 5's plain CLIPImageProcessor is the torchvision backend, which cannot be
    # installed next to torch 2.13+cpu; the PIL backend gives the same pixels.
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)
    return model


def build_whisper_tiny(out_dir: Path, seed: int) -> WhisperModel:
    """Whisper encoder-decoder on 1 s windows (100 mel frames -> 50 encoder frames, 64-d)."""
    config = WhisperConfig(
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=80,
        # The encoder rejects any input whose length is not exactly 2 * max_source_positions
        # frames, so this must match the extractor's chunk_length=1 (100 frames).
        max_source_positions=50,
        max_target_positions=32,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    with _seeded(seed):
        model = WhisperModel(config).eval()
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(out_dir)
    return model


def sbert_vocabulary() -> list[str]:
    """WordPiece vocabulary for the tiny BERT: specials, characters, and every synthetic word.

    Each single character also appears as a `##` continuation so that any lowercase ASCII word
    splits into pieces instead of collapsing to [UNK].
    """
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = sorted({w for text in text_corpus() for w in re.findall(r"[a-z0-9]+", text.lower())} - set(chars))
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]


def build_sbert_tiny(out_dir: Path, seed: int) -> SentenceTransformer:
    """sentence-transformers model: tiny random BERT + mean pooling (32-d embeddings)."""
    # sentence-transformers' Transformer module loads its backbone from a directory, so the
    # random BERT is staged as an ordinary HF checkpoint first.
    with tempfile.TemporaryDirectory(prefix="sbert-backbone-") as staging:
        # transformers 5 takes the vocabulary as `vocab`; a `vocab_file=` argument is silently
        # ignored and leaves the 5 special tokens as the whole vocabulary.
        vocab = {token: i for i, token in enumerate(sbert_vocabulary())}
        tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
        # Keep BERT's pooler: the Transformer module reloads the backbone with one, and a
        # pooler missing from the checkpoint would be filled with unseeded random weights.
        with _seeded(seed):
            bert = BertModel(config).eval()
        bert.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=config.max_position_embeddings)
        pooling = Pooling(config.hidden_size, pooling_mode="mean")
        model = SentenceTransformer(modules=[transformer, pooling], device="cpu")
        model.save(str(out_dir), create_model_card=False)
    return model


def build_qwen2_tiny(out_dir: Path, seed: int) -> Qwen2ForCausalLM:
    """Qwen2 causal LM (64-d, 2 layers, GQA 4/2 heads) with a locally trained ChatML BPE tokenizer."""
    tokenizer = train_bpe_tokenizer([*text_corpus(), *CHAT_TEXTS], vocab_size=QWEN_VOCAB_SIZE)
    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.02,
        # As in Qwen2 instruct checkpoints: bos is <|endoftext|>, a turn ends at <|im_end|>.
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    with _seeded(seed):
        model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
