"""The models gpu_check.py measures: random weights, real shapes, saved like hub checkpoints.

A GPU box without internet cannot download CLIP or Qwen, and speed depends on shapes, not on
trained values, so each model is built from its config with random weights and saved to a
directory that the repo loads through its ordinary `from_pretrained` path. `--dry-run` uses the
repo's own tiny test models (edge_glass.local_models.tiny) instead, so the whole check runs on a
CPU in seconds.

Real shapes: CLIP ViT-L/14-336 (LLaVA-1.5's vision tower), Whisper-base's encoder on a 1-s
window and all-MiniLM-L6-v2's BERT (the encoders of the quickstart and of
benchmarks/train_throughput.py --encoders realistic), Qwen2.5-0.5B (896 wide, 24 layers,
14 query / 2 key-value heads, 151,936-token vocabulary, tied embeddings) and Qwen2.5-1.5B (1536
wide, 28 layers, 12 / 2 heads).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from edge_glass.local_models import tiny

# Qwen2.5-0.5B's config.json, less the fields that do not change the compute.
QWEN25_05B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


# Qwen2.5-1.5B's: the decoder of the experiment configs.
QWEN25_15B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)


def _init_device() -> torch.device:
    # Random init of ~800M parameters is several times faster on the GPU than on 16 CPU cores.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_clip_vit_l14_336(out: Path) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    torch.manual_seed(0)
    with _init_device():
        model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(out)
    # The PIL backend: the plain processor is the torchvision one, absent from the CPU stack.
    CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)
    return out


def build_whisper_base(out: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(d_model=512, encoder_layers=6, decoder_layers=1, encoder_attention_heads=8,
                           decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, num_mel_bins=80,
                           max_source_positions=1500)
    torch.manual_seed(0)
    with _init_device():
        model = WhisperModel(config)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


def build_minilm_l6(out: Path) -> Path:
    """all-MiniLM-L6-v2's shape (BERT, 384 wide, 6 layers) + mean pooling, with the tiny test
    model's vocabulary: captions tokenise to about as many pieces, and the vocabulary size only
    changes an embedding lookup."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    with tempfile.TemporaryDirectory(prefix="minilm-backbone-") as staging:
        tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tiny.sbert_vocabulary())}, do_lower_case=True)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        BertModel(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=256)
        SentenceTransformer(modules=[transformer, Pooling(config.hidden_size, pooling_mode="mean")],
                            device="cpu").save(str(out), create_model_card=False)
    return out


def build_qwen25_05b(out: Path, shape: dict = QWEN25_05B) -> Path:
    """Qwen2.5-0.5B's shape in bf16 (as the hub checkpoint), with the tiny model's ChatML
    tokenizer: its ids are a few hundred, all valid rows of the full-size embedding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from edge_glass.data.synthetic_attributes import text_corpus
    from edge_glass.local_models.tokenizer import ENDOFTEXT, IM_END, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([*text_corpus(), *tiny.CHAT_TEXTS], vocab_size=tiny.QWEN_VOCAB_SIZE)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(ENDOFTEXT), tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(**shape, bos_token_id=endoftext, eos_token_id=im_end, pad_token_id=endoftext)
    torch.manual_seed(0)
    with _init_device():
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BUILDERS = {
    # name: (tiny builder for --dry-run, real-shape builder)
    "vision": (tiny.build_clip_vision_tiny, build_clip_vit_l14_336),
    "audio": (tiny.build_whisper_tiny, build_whisper_base),
    "text": (tiny.build_sbert_tiny, build_minilm_l6),
    "qwen": (tiny.build_qwen2_tiny, build_qwen25_05b),
    "qwen-1.5b": (tiny.build_qwen2_tiny, lambda out: build_qwen25_05b(out, QWEN25_15B)),
}


def model_dir(root: Path, name: str, dry_run: bool) -> Path:
    """The directory of model `name` under `root`, built on first use (sections build only
    what they measure, so one failing builder costs one section)."""
    out = root / name
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        small, real = BUILDERS[name]
        if dry_run:
            small(out, 0)
        else:
            real(out)
    return out
