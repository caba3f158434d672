"""Instruct stage, unit by unit, fast and in-process (no store, no DeepSpeed, no subprocess).

    InstructBatcher   feature batch -> one sequence per caption/QA example (qwen and trm inputs)
    InstructModel     frozen/trained adapters, LoRA, prefix shapes, tokens connector, causal baseline
    instruct_metrics  max_samples, per-attribute groups, EM with a patched `generate`
    qa_rows           grouping of metric keys into report rows
    adapters          the flat adapter; every kind with bf16 parameters and fp16 features
    config            the instruct stage's cross-section rules

Run with: python -m pytest tests/test_instruct_units.py -q
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from edge_glass.config import AdapterConfig, ConfigError, apply_overrides, config_from_dict
from edge_glass.data.instruct import CAPTION_PROMPTS
from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.models.adapters import ModalityAdapter
from edge_glass.models.alignment import FeatureInfo
from edge_glass.utils.errors import UserError

# Tiny feature dims per modality: (token dim, tokens, pooled dim).
DIMS = {"vision": (8, 4, 6), "audio": (6, 5, 5), "text": (4, 3, 7)}
N_PREFIX = 2
# The causal baseline over the trm base config: recursion settings back at their defaults.
CAUSAL = ("decoder.trm.recursive=false", "decoder.trm.h_cycles=3", "decoder.trm.l_cycles=6", "decoder.trm.n_sup=16")


# ---------------------------------------------------------------------------------------------
# Fixtures and builders
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    """The tiny random Qwen2 + ChatML tokenizer of the local model set (only that model: the
    others are not needed here, and building them costs seconds)."""
    from edge_glass.local_models.build import model_specs

    (spec,) = [s for s in model_specs(include_real=False) if s.name == "qwen2-tiny"]
    out = tmp_path_factory.mktemp("instruct-units") / "qwen2-tiny"
    out.mkdir()
    spec.build(out, 0)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(autouse=True)
def one_thread():
    """Two shared cores: one intra-op thread is faster for these tiny shapes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def instruct_dict(qwen_dir: str, overrides: tuple[str, ...] = (), *, kind: str = "qwen") -> dict:
    """A valid instruct-stage config mapping with tiny dims (vision, audio and text adapters)."""
    decoder: dict = {"kind": kind, "num_prefix_tokens": N_PREFIX, "connector_hidden_dim": 32}
    if kind == "qwen":
        decoder["qwen"] = {"model": qwen_dir, "tune": "frozen", "max_length": 96}
    else:
        decoder["trm"] = {
            "tokenizer": qwen_dir, "hidden_dim": 16, "num_layers": 1, "num_heads": 2,
            "h_cycles": 2, "l_cycles": 1, "n_sup": 2, "max_answer_len": 4,
        }
    data = {
        "experiment": {"name": "instruct-units"},
        "data": {"raw_dir": "raw", "features_dir": "features"},
        "train": {"stage": "instruct", "max_steps": 1},
        "encoders": {m: {"model": m} for m in ("vision", "audio", "text")},
        "model": {"shared_dim": 16, "adapters": {m: {"kind": "mlp", "hidden_dim": 16} for m in ("vision", "audio", "text")}},
        "decoder": decoder,
    }
    return apply_overrides(data, list(overrides))


def instruct_cfg(qwen_dir: str, *overrides: str, kind: str = "qwen"):
    return config_from_dict(instruct_dict(qwen_dir, overrides, kind=kind))


def feature_info(modality: str, seed: int = 0, max_tokens: int | None = None) -> FeatureInfo:
    d, t, p = DIMS[modality]
    g = torch.Generator().manual_seed(seed)
    return FeatureInfo(
        token_mean=torch.randn(d, generator=g) * 0.1, token_std=torch.rand(d, generator=g) + 0.5,
        pooled_mean=torch.randn(p, generator=g) * 0.1, pooled_std=torch.rand(p, generator=g) + 0.5,
        max_tokens=max_tokens or t,
    )


def features() -> dict[str, FeatureInfo]:
    return {m: feature_info(m, i) for i, m in enumerate(DIMS)}


def meta(sample_id: str, qa=(), **extra) -> str:
    """A raw sample's JSON as the loader hands it over."""
    pairs = [{"attribute": a, "question": q, "answer": ans} for a, q, ans in qa]
    return json.dumps({"id": sample_id, "qa": pairs, **extra})


COLOUR = ("colour", "What colour is the shape?", "red")
SHAPE = ("shape", "What shape is it?", "circle")
COLOUR_BLUE = ("colour", "What colour is the shape?", "blue")


def feature_batch(samples: list[tuple[str, str, str]], modalities=("vision", "audio", "text"), seed: int = 0) -> dict:
    """A FeatureLoader-like batch of (key, caption, meta JSON) samples: fp16 features, token masks
    with varying lengths (zero past each length, as the store pads)."""
    g = torch.Generator().manual_seed(seed)
    b = len(samples)
    batch: dict = {"keys": [s[0] for s in samples], "captions": [s[1] for s in samples], "meta": [s[2] for s in samples]}
    for m in modalities:
        d, t, p = DIMS[m]
        lengths = torch.tensor([t - (i % 2) for i in range(b)])
        mask = torch.arange(t)[None, :] < lengths[:, None]
        tokens = torch.randn(b, t, d, generator=g) * mask.unsqueeze(-1)
        batch[m] = {"tokens": tokens.half(), "mask": mask, "pooled": torch.randn(b, p, generator=g).half()}
    return batch


def three_samples() -> list[tuple[str, str, str]]:
    """s0: caption + colour + shape; s1: caption + colour; s2: QA-only source (caption_kind qa) + colour."""
    return [
        ("s0", "a large red circle", meta("s0", [COLOUR, SHAPE])),
        ("s1", "a small blue square", meta("s1", [COLOUR_BLUE])),
        ("s2", "What colour is the shape? red", meta("s2", [COLOUR], caption_kind="qa")),
    ]


def batcher_for(cfg, tokenizer):
    from edge_glass.decoders.registry import build_decoder
    from edge_glass.training.instruct_batches import InstructBatcher

    return InstructBatcher(cfg, build_decoder(cfg.decoder))


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# InstructBatcher: qwen
# ---------------------------------------------------------------------------------------------


def test_qwen_batch_has_one_sequence_per_example_with_labels_on_answer_and_end_of_turn(qwen_dir, tokenizer):
    cfg = instruct_cfg(qwen_dir, "decoder.prefix_modalities=[vision, audio]")
    batcher = batcher_for(cfg, tokenizer)
    batch = feature_batch(three_samples())
    out = batcher.eval_batch(batch)
    # s0: caption, colour, shape; s1: caption, colour; s2 (caption_kind qa): colour only.
    assert out["example_sample"].tolist() == [0, 0, 0, 1, 1, 2]
    assert out["kinds"] == ["caption", "qa", "qa", "caption", "qa", "qa"]
    assert out["attributes"] == [None, "colour", "shape", None, "colour", "colour"]
    assert out["answers"] == ["a large red circle", "red", "circle", "a small blue square", "blue", "red"]
    assert out["example_keys"] == ["s0", "s0", "s0", "s1", "s1", "s2"]
    assert out["questions"][1:3] == ["What colour is the shape?", "What shape is it?"]
    assert out["questions"][0] in CAPTION_PROMPTS["vision+audio"] and out["questions"][3] in CAPTION_PROMPTS["vision+audio"]
    # The features of the B samples are passed through untouched.
    assert out["keys"] == ["s0", "s1", "s2"] and out["vision"]["tokens"] is batch["vision"]["tokens"]

    n = 6
    assert out["input_ids"].shape[0] == out["labels"].shape[0] == out["attention_mask"].shape[0] == n
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id
    # Two prefix modalities x N_PREFIX slots, holding the placeholder id.
    assert out["prefix_positions"].shape == (n, 2 * N_PREFIX)
    for i in range(n):
        length = int(out["attention_mask"][i].sum())
        row, labels = out["input_ids"][i, :length].tolist(), out["labels"][i].tolist()
        answer = ids(tokenizer, out["answers"][i]) + [eot]
        supervised = [j for j, v in enumerate(labels) if v != IGNORE_INDEX]
        # Supervised: exactly the answer and the end of turn, the last tokens of the sequence.
        assert supervised == list(range(length - len(answer), length)), i
        assert [labels[j] for j in supervised] == answer == row[-len(answer):]
        assert out["attention_mask"][i, length:].sum() == 0 and (out["input_ids"][i, length:] == pad).all()
        slots = out["prefix_positions"][i].tolist()
        assert slots == list(range(slots[0], slots[0] + 2 * N_PREFIX)) and all(row[j] == pad for j in slots)
        # The generation prompt of the example is the training sequence minus its answer.
        prompt = out["prompts"][i]
        assert prompt["input_ids"] == row[: length - len(answer)] and prompt["prefix_positions"] == slots
        assert tokenizer.decode(row[: length - len(answer)]).rstrip().endswith("assistant")
        assert out["questions"][i] in tokenizer.decode(row)


def test_train_batch_is_eval_batch_without_the_scoring_fields(qwen_dir, tokenizer):
    cfg = instruct_cfg(qwen_dir)
    batcher = batcher_for(cfg, tokenizer)
    batch = feature_batch(three_samples())
    train, full = batcher.train_batch(batch), batcher.eval_batch(batch)
    assert set(full) - set(train) == {"answers", "kinds", "attributes", "example_keys", "questions", "prompts"}
    for k in ("input_ids", "labels", "attention_mask", "prefix_positions", "example_sample"):
        assert torch.equal(train[k], full[k]), k
    assert train["prefix_positions"].shape == (6, N_PREFIX)


def test_qa_instructions_drop_caption_examples(qwen_dir, tokenizer):
    cfg = instruct_cfg(qwen_dir, "decoder.instructions=[qa]")
    samples = three_samples() + [("s3", "a green star", meta("s3"))]  # caption only: no example at all
    out = batcher_for(cfg, tokenizer).eval_batch(feature_batch(samples))
    assert out["kinds"] == ["qa"] * 4
    assert out["example_sample"].tolist() == [0, 0, 1, 2]
    assert out["answers"] == ["red", "circle", "blue", "red"]
    assert out["input_ids"].shape[0] == 4


def test_caption_instructions_only_and_caption_kind_qa(qwen_dir, tokenizer):
    cfg = instruct_cfg(qwen_dir, "decoder.instructions=[caption]")
    out = batcher_for(cfg, tokenizer).eval_batch(feature_batch(three_samples()))
    # s2's text is its first QA pair (caption_kind qa): no describe-it example from it.
    assert out["kinds"] == ["caption", "caption"] and out["example_sample"].tolist() == [0, 1]
    assert out["answers"] == ["a large red circle", "a small blue square"]
    assert all(q in CAPTION_PROMPTS["vision"] for q in out["questions"])


def test_batch_without_any_example_names_decoder_instructions(qwen_dir, tokenizer):
    cfg = instruct_cfg(qwen_dir, "decoder.instructions=[qa]")
    batch = feature_batch([("c0", "a red circle", meta("c0")), ("c1", "a blue square", meta("c1"))])
    batcher = batcher_for(cfg, tokenizer)
    with pytest.raises(UserError, match=r"decoder\.instructions"):
        batcher.train_batch(batch)
    with pytest.raises(UserError, match=r"decoder\.instructions"):
        batcher.eval_batch(batch)


# ---------------------------------------------------------------------------------------------
# InstructBatcher: trm
# ---------------------------------------------------------------------------------------------


def test_trm_batch_questions_and_fixed_length_labels(qwen_dir, tokenizer):
    from edge_glass.decoders.trm import special_ids

    cfg = instruct_cfg(qwen_dir, kind="trm")
    eos, pad = special_ids(tokenizer)
    batcher = batcher_for(cfg, tokenizer)
    long_answer = "a large red circle in the top left"
    samples = [
        ("s0", long_answer, meta("s0", [COLOUR])),
        ("s1", "", meta("s1", [SHAPE])),
    ]
    out = batcher.eval_batch(feature_batch(samples))
    assert out["example_sample"].tolist() == [0, 0, 1]
    assert out["answers"] == [long_answer, "red", "circle"]
    assert "input_ids" not in out and "prompts" not in out
    a = cfg.decoder.trm.max_answer_len
    assert out["labels"].shape == (3, a)
    q_ids, q_mask = out["question_ids"], out["question_mask"]
    assert q_ids.shape == q_mask.shape and q_mask.dtype == torch.bool and q_ids.shape[0] == 3
    for i, (question, answer) in enumerate(zip(out["questions"], out["answers"])):
        # The plain question (no chat template), right-padded with the pad id.
        assert q_ids[i][q_mask[i]].tolist() == ids(tokenizer, question)
        assert (q_ids[i][~q_mask[i]] == pad).all() and q_mask[i].tolist() == sorted(q_mask[i].tolist(), reverse=True)
        # Answer (cut to max_answer_len - 1 tokens), EOS, then -100.
        target = ids(tokenizer, answer)[: a - 1] + [eos]
        assert out["labels"][i].tolist() == target + [IGNORE_INDEX] * (a - len(target))
    assert len(ids(tokenizer, long_answer)) > a - 1  # the cut really happened for row 0
    assert out["labels"][0, -1].item() == eos
    assert out["questions"][0] in CAPTION_PROMPTS["vision"]


# ---------------------------------------------------------------------------------------------
# InstructModel
# ---------------------------------------------------------------------------------------------


def model_and_batch(qwen_dir, tokenizer, *overrides: str, kind: str = "qwen", samples=None):
    from edge_glass.training.instruct_batches import InstructBatcher
    from edge_glass.training.instruct_model import InstructModel

    torch.manual_seed(0)
    cfg = instruct_cfg(qwen_dir, *overrides, kind=kind)
    model = InstructModel(cfg, features())
    batcher = InstructBatcher(cfg, model.decoder)
    return model, batcher.eval_batch(feature_batch(samples or three_samples()))


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_adapters_stay_in_eval_mode_and_only_the_connector_trains(qwen_dir, tokenizer):
    model, batch = model_and_batch(
        qwen_dir, tokenizer, "train.freeze_adapters=true", "model.adapters.vision.dropout=0.5",
    )
    assert not any(p.requires_grad for p in model.align.parameters())
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("connectors.")}
    model.eval()
    model.train()
    assert model.training and all(m.training for m in model.connectors.modules())
    assert not any(m.training for m in model.align.modules())  # dropout off in the adapters
    p1, p2 = model.prefix(batch), model.prefix(batch)
    assert torch.equal(p1, p2) and p1.requires_grad  # the connector's graph is there
    loss, _ = model(batch)
    loss.backward()
    assert all(p.grad is None for p in model.align.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors.parameters())


def test_frozen_adapters_are_in_eval_mode_from_construction(qwen_dir, tokenizer):
    """No mode switch needed: a freshly built model (the trainer's first steps) has no adapter dropout."""
    model, batch = model_and_batch(
        qwen_dir, tokenizer, "train.freeze_adapters=true", "model.adapters.vision.dropout=0.5",
    )
    assert model.training and model.connectors.training
    assert not any(m.training for m in model.align.modules())
    assert torch.equal(model.prefix(batch), model.prefix(batch))


def test_trained_adapters_use_dropout_in_training(qwen_dir, tokenizer):
    """The contrast to the frozen case: with freeze_adapters false the same adapter drops out, so
    the check above would see two different prefixes if the frozen adapters were not in eval mode."""
    model, batch = model_and_batch(
        qwen_dir, tokenizer, "train.freeze_adapters=false", "model.adapters.vision.dropout=0.5",
    )
    model.train()
    assert model.align.adapters["vision"].training
    assert not torch.equal(model.prefix(batch), model.prefix(batch))
    model.eval()
    assert torch.equal(model.prefix(batch), model.prefix(batch))


@pytest.mark.parametrize("prefix", [["vision"], ["vision", "audio"]])
def test_unfrozen_adapters_train_only_for_prefix_modalities(qwen_dir, tokenizer, prefix):
    model, batch = model_and_batch(
        qwen_dir, tokenizer, "train.freeze_adapters=false", f"decoder.prefix_modalities=[{', '.join(prefix)}]",
    )
    expected = {
        n for n, _ in model.named_parameters()
        if n.startswith("connectors.") or any(n.startswith(f"align.adapters.{m}.") for m in prefix)
    }
    assert _trainable(model) == expected
    assert not any(p.requires_grad for p in model.align.adapters["text"].parameters())
    model.train()
    loss, _ = model(batch)
    loss.backward()
    for m in ("vision", "audio", "text"):
        grads = [p.grad for p in model.align.adapters[m].parameters()]
        if m in prefix:
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, m
        else:
            assert all(g is None for g in grads), m


def test_lora_trains_exactly_lora_tensors_and_connectors(qwen_dir, tokenizer):
    model, batch = model_and_batch(qwen_dir, tokenizer, "decoder.qwen.tune=lora")
    names = [n for n, _ in model.named_parameters()]
    lora = {n for n in names if "lora_" in n}
    connectors = {n for n in names if n.startswith("connectors.")}
    assert lora and connectors
    assert _trainable(model) == lora | connectors
    model.train()
    loss, _ = model(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in connectors)


def test_prefix_shape_loss_and_backward_with_two_prefix_modalities(qwen_dir, tokenizer):
    model, batch = model_and_batch(
        qwen_dir, tokenizer, "decoder.prefix_modalities=[vision, audio]", "decoder.num_prefix_tokens=3",
    )
    width = model.decoder.hidden_size
    prefix = model.prefix(batch)
    assert prefix.shape == (3, 2 * 3, width)  # B samples, not N examples
    # Each modality's connector makes its own slice of the prefix.
    vision_only = model.connectors["vision"](model.align.adapters["vision"](batch["vision"]))
    assert torch.allclose(prefix[:, :3], vision_only)
    model.train()
    loss, terms = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and terms == {}
    loss.backward()
    for m in ("vision", "audio"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors[m].parameters()), m


def test_lm_weight_scales_the_loss(qwen_dir, tokenizer):
    model, batch = model_and_batch(qwen_dir, tokenizer)
    model.eval()
    with torch.no_grad():
        base, _ = model(batch)
        model.lm_weight = 0.25
        scaled, _ = model(batch)
    assert torch.allclose(scaled, 0.25 * base)


def test_tokens_connector_reads_perceiver_latents(qwen_dir, tokenizer):
    model, batch = model_and_batch(
        qwen_dir, tokenizer,
        "decoder.connector_input=tokens",
        f"model.adapters.vision={{kind: perceiver, hidden_dim: 16, num_latents: {N_PREFIX}, depth: 1, num_heads: 2}}",
    )
    assert model.connectors["vision"].in_dim == 16 and model.connectors["vision"].input == "tokens"
    prefix = model.prefix(batch)
    assert prefix.shape == (3, N_PREFIX, model.decoder.hidden_size)
    latents = model.align.adapters["vision"].resampled_tokens(batch["vision"])
    assert torch.allclose(prefix, model.connectors["vision"](latents))
    model.train()
    loss, _ = model(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.connectors["vision"].parameters())


def test_trm_not_recursive_builds_the_causal_baseline(qwen_dir, tokenizer):
    from edge_glass.decoders.causal_baseline import CausalBaseline

    model, batch = model_and_batch(qwen_dir, tokenizer, *CAUSAL, kind="trm")
    assert model.kind == "causal" and isinstance(model.decoder, CausalBaseline)
    assert model.connectors["vision"].out_dim == 16
    model.train()
    loss, terms = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and terms == {}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors.parameters())


def test_trm_recursive_forward(qwen_dir, tokenizer):
    from edge_glass.decoders.trm import TRM

    model, batch = model_and_batch(qwen_dir, tokenizer, kind="trm")
    assert model.kind == "trm" and isinstance(model.decoder, TRM)
    model.train()
    loss, terms = model(batch)
    assert torch.isfinite(loss) and set(terms) == {"trm/exact", "trm/first_exact"}
    loss.backward()
    assert all(p.grad is not None for p in model.connectors.parameters())


# ---------------------------------------------------------------------------------------------
# instruct_metrics and _first_samples
# ---------------------------------------------------------------------------------------------


def eval_batches(qwen_dir, tokenizer, *overrides: str):
    """A qwen model with frozen decoder and two eval batches: samples with 3, 2 | 1, 2 examples
    (3 captions and 5 QA: colour 3, shape 2)."""
    model, first = model_and_batch(qwen_dir, tokenizer, *overrides, samples=[
        ("a0", "a large red circle", meta("a0", [COLOUR, SHAPE])),
        ("a1", "a small blue square", meta("a1", [COLOUR_BLUE])),
    ])
    from edge_glass.training.instruct_batches import InstructBatcher

    batcher = InstructBatcher(model.cfg, model.decoder)
    second = batcher.eval_batch(feature_batch([
        ("b0", "What shape is it? circle", meta("b0", [SHAPE], caption_kind="qa")),
        ("b1", "a red triangle", meta("b1", [COLOUR])),
    ], seed=1))
    return model, [first, second]


def test_first_samples_keeps_the_first_samples_and_their_examples(qwen_dir, tokenizer):
    from edge_glass.training.instruct_eval import _first_samples

    model, (batch, _) = eval_batches(qwen_dir, tokenizer)
    assert batch["example_sample"].tolist() == [0, 0, 0, 1, 1]
    cut = _first_samples(batch, 1)
    assert cut["keys"] == ["a0"] and cut["captions"] == ["a large red circle"] and len(cut["meta"]) == 1
    for m in ("vision", "audio", "text"):
        for k in ("tokens", "mask", "pooled"):
            assert torch.equal(cut[m][k], batch[m][k][:1]), (m, k)
    assert cut["example_sample"].tolist() == [0, 0, 0]
    for k in ("input_ids", "labels", "attention_mask", "prefix_positions"):
        assert torch.equal(cut[k], batch[k][:3]), k
    for k in ("answers", "kinds", "attributes", "example_keys", "questions", "prompts"):
        assert cut[k] == batch[k][:3], k
    # The cut batch still runs through the model.
    assert model.prefix(cut)[cut["example_sample"]].shape[0] == 3


def _patch_generate(monkeypatch, batches, answer_for):
    """Replace the Qwen decoder's generate: answer_for(gold) per example of the batch being scored.

    The batch is recognised by its prompts (the first prompt of each batch is distinct), and a cut
    batch keeps a prefix of its examples, so the gold answers are the first len(prompts)."""
    import edge_glass.decoders.generation as ie

    calls = []

    def fake_generate(decoder, prefix, prompts, *, max_new_tokens, synced_gpus=False):
        (batch,) = [b for b in batches if b["prompts"][: len(prompts)] == list(prompts)]
        assert prefix.shape[0] == len(prompts) and max_new_tokens == 7
        calls.append(len(prompts))
        return [answer_for(gold) for gold in batch["answers"][: len(prompts)]]

    monkeypatch.setattr(ie, "generate", fake_generate)
    return calls


def test_instruct_metrics_gold_answers_score_one_and_max_samples_bounds_the_examples(qwen_dir, tokenizer, monkeypatch):
    from edge_glass.training.instruct_eval import instruct_metrics

    model, batches = eval_batches(qwen_dir, tokenizer)
    calls = _patch_generate(monkeypatch, batches, lambda gold: gold.upper() + ".")  # normalisation: still exact
    model.train()
    metrics, logged = instruct_metrics(model, iter(batches), max_new_tokens=7, max_samples=3, num_samples_to_log=4)
    assert model.training  # restored
    # Samples a0 (3 examples), a1 (2), b0 (1): the fourth sample, b1, is not scored.
    assert calls == [5, 1]
    assert metrics["num_examples"] == 6
    assert metrics["exact_match"] == 1.0 and metrics["token_f1"] == 1.0
    for group in ("caption", "qa", "qa/colour", "qa/shape"):
        assert metrics[f"{group}/exact_match"] == 1.0 and metrics[f"{group}/token_f1"] == 1.0, group
    assert "qa/None/exact_match" not in metrics and "caption/None/exact_match" not in metrics
    assert torch.isfinite(torch.tensor(metrics["lm_loss"])) and metrics["lm_loss"] > 0
    assert len(logged) == 4 and [r["key"] for r in logged] == ["a0", "a0", "a0", "a1"]
    assert logged[1]["answer"] == "red" and logged[1]["prediction"] == "RED." and logged[1]["exact_match"] == 1.0
    assert logged[1]["attribute"] == "colour" and logged[1]["question"] == "What colour is the shape?"


def test_instruct_metrics_wrong_answers_score_zero_and_counts_per_group(qwen_dir, tokenizer, monkeypatch):
    from edge_glass.training.instruct_eval import instruct_metrics

    model, batches = eval_batches(qwen_dir, tokenizer)
    _patch_generate(monkeypatch, batches, lambda gold: "zzz")
    metrics, _ = instruct_metrics(model, iter(batches), max_new_tokens=7)
    assert metrics["num_examples"] == 8  # every sample: 3 + 2 | 1 + 2
    assert {k: v for k, v in metrics.items() if k.endswith(("exact_match", "token_f1"))} == {
        f"{g}{m}": 0.0 for g in ("", "caption/", "qa/", "qa/colour/", "qa/shape/") for m in ("exact_match", "token_f1")
    }


def test_instruct_metrics_mixed_answers_average_per_group(qwen_dir, tokenizer, monkeypatch):
    from edge_glass.training.instruct_eval import instruct_metrics

    model, batches = eval_batches(qwen_dir, tokenizer)
    # Right on QA, wrong on captions.
    _patch_generate(monkeypatch, batches, lambda gold: gold if len(gold.split()) == 1 else "nothing")
    metrics, _ = instruct_metrics(model, iter(batches), max_new_tokens=7)
    assert metrics["caption/exact_match"] == 0.0 and metrics["qa/exact_match"] == 1.0
    assert metrics["exact_match"] == pytest.approx(5 / 8)  # 5 QA of 8 examples
    assert metrics["qa/colour/exact_match"] == 1.0 and metrics["qa/shape/exact_match"] == 1.0


@pytest.mark.parametrize("kind, overrides", [("qwen", ()), ("trm", ()), ("trm", CAUSAL)], ids=["qwen", "trm", "causal"])
def test_instruct_metrics_cut_to_samples_without_examples(qwen_dir, tokenizer, kind, overrides):
    from edge_glass.training.instruct_eval import instruct_metrics

    model, batch = model_and_batch(qwen_dir, tokenizer, "decoder.instructions=[qa]", *overrides, kind=kind, samples=[
        ("c0", "a red circle", meta("c0")),  # caption only: no QA example
        ("q1", "a blue square", meta("q1", [COLOUR_BLUE])),
    ])
    assert batch["example_sample"].tolist() == [1]
    # max_samples=1 keeps c0 only, which has nothing to score: no example, no error.
    metrics, _ = instruct_metrics(model, iter([batch]), max_new_tokens=4, max_samples=1)
    assert metrics["num_examples"] == 0


def test_instruct_metrics_causal_baseline(qwen_dir, tokenizer):
    from edge_glass.training.instruct_eval import instruct_metrics

    model, batch = model_and_batch(qwen_dir, tokenizer, *CAUSAL, kind="trm")
    metrics, logged = instruct_metrics(model, iter([batch]), max_new_tokens=4, max_samples=2, num_samples_to_log=1)
    assert metrics["num_examples"] == 5  # s0 (3) + s1 (2)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and torch.isfinite(torch.tensor(metrics["lm_loss"]))
    assert {"qa/colour/exact_match", "qa/shape/exact_match", "caption/token_f1"} <= set(metrics)
    assert "trm/halt_step" not in metrics and len(logged) == 1


# ---------------------------------------------------------------------------------------------
# qa_rows
# ---------------------------------------------------------------------------------------------


def test_qa_rows_groups_keys():
    from edge_glass.training.instruct_report import qa_rows

    metrics = {
        "val/qa/shape/token_f1": 0.7,
        "val/lm_loss": 2.0,
        "val/token_f1": 0.4,
        "val/qa/colour/exact_match": 0.9,
        "val/exact_match": 0.5,
        "val/caption/exact_match": 0.1,
        "val/qa/exact_match": 0.8,
        "val/num_examples": 12.0,
        "val/trm/halt_step": 3.0,
        "val/caption/token_f1": 0.2,
        "val/qa/token_f1": 0.85,
        "val/qa/colour/token_f1": 0.95,
        "val/qa/shape/exact_match": 0.6,
    }
    assert qa_rows(metrics) == [
        {"group": "all", "exact_match": 0.5, "token_f1": 0.4},
        {"group": "caption", "exact_match": 0.1, "token_f1": 0.2},
        {"group": "qa", "exact_match": 0.8, "token_f1": 0.85},
        {"group": "qa/colour", "exact_match": 0.9, "token_f1": 0.95},
        {"group": "qa/shape", "exact_match": 0.6, "token_f1": 0.7},
    ]
    # Without the val/ prefix (evaluate.py's test metrics) the rows are the same.
    assert qa_rows({k.removeprefix("val/"): v for k, v in metrics.items()}) == qa_rows(metrics)
    # A group with one metric only gets a row with that metric.
    assert qa_rows({"qa/size/token_f1": 0.3}) == [{"group": "qa/size", "token_f1": 0.3}]
    assert qa_rows({"lm_loss": 1.0, "num_examples": 3}) == []


# ---------------------------------------------------------------------------------------------
# Adapters: flat, and bf16 parameters with fp16 features
# ---------------------------------------------------------------------------------------------


def adapter(kind: str, modality: str = "vision", max_tokens: int | None = None, dropout: float = 0.0, **kw) -> ModalityAdapter:
    torch.manual_seed(0)
    info = feature_info(modality, max_tokens=max_tokens)
    extra = {"num_heads": 2} if kind in ("attn_pool", "perceiver") else {}
    if kind == "perceiver":
        extra.update(num_latents=3, depth=1)
    cfg = AdapterConfig(kind=kind, hidden_dim=16, dropout=dropout, **extra, **kw)
    return ModalityAdapter(cfg, (info.token_mean, info.token_std), (info.pooled_mean, info.pooled_std), 12, info.max_tokens)


def tokens_batch(b: int, t: int, d: int, lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    tokens = (torch.randn(b, t, d, generator=g) * mask.unsqueeze(-1)).half()
    return {"tokens": tokens, "mask": mask, "pooled": torch.randn(b, 6, generator=g).half()}


def test_flat_adapter_ignores_padded_values_but_not_valid_ones_or_their_order():
    ad = adapter("flat", max_tokens=5).eval()
    x = tokens_batch(2, 5, 8, [5, 3])
    out = ad(x)
    assert out.shape == (2, 12)
    garbage = {k: v.clone() for k, v in x.items()}
    garbage["tokens"][1, 3:] = torch.randn(2, 8).half() * 50
    assert torch.equal(ad(garbage), out)
    changed = {k: v.clone() for k, v in x.items()}
    changed["tokens"][1, 1] += 1.0
    assert not torch.allclose(ad(changed)[1], out[1]) and torch.equal(ad(changed)[0], out[0])
    swapped = {k: v.clone() for k, v in x.items()}
    swapped["tokens"][0] = x["tokens"][0, [1, 0, 2, 3, 4]]
    assert not torch.allclose(ad(swapped)[0], out[0])  # positions matter: no pooling


def test_flat_adapter_pads_short_and_cuts_long_sequences():
    ad = adapter("flat", max_tokens=5).eval()
    x = tokens_batch(2, 5, 8, [3, 3])
    short = {"tokens": x["tokens"][:, :3], "mask": x["mask"][:, :3], "pooled": x["pooled"]}
    # A batch whose longest sequence is 3: zero-padded to 5 it equals the explicitly padded one.
    assert torch.allclose(ad(short), ad(x), atol=1e-6)
    longer = tokens_batch(2, 7, 8, [7, 6], seed=1)
    out = ad(longer)
    cut = {"tokens": longer["tokens"][:, :5], "mask": longer["mask"][:, :5], "pooled": longer["pooled"]}
    assert torch.allclose(out, ad(cut), atol=1e-6)
    tail = {k: v.clone() for k, v in longer.items()}
    tail["tokens"][:, 5:] = torch.randn(2, 2, 8).half()
    assert torch.equal(ad(tail), out)


def test_flat_adapter_needs_max_tokens():
    info = feature_info("vision")
    cfg = AdapterConfig(kind="flat", hidden_dim=16)
    with pytest.raises(ValueError, match="max_tokens"):
        ModalityAdapter(cfg, (info.token_mean, info.token_std), (info.pooled_mean, info.pooled_std), 12)
    with pytest.raises(ValueError, match="max_tokens"):
        ModalityAdapter(cfg, (info.token_mean, info.token_std), (info.pooled_mean, info.pooled_std), 12, None)


@pytest.mark.parametrize("kind", ["mlp", "flat", "attn_pool", "perceiver"])
@pytest.mark.parametrize("cast", ["param_data", "module"])
def test_bf16_adapters_take_fp16_features(kind, cast):
    ad = adapter(kind, max_tokens=5, dropout=0.1)
    reference = copy.deepcopy(ad).eval()
    if cast == "param_data":
        for p in ad.parameters():  # what DeepSpeed's bf16 engine does: parameters only
            p.data = p.data.bfloat16()
    else:
        ad.bfloat16()  # buffers (the standardisation statistics) too
    x = tokens_batch(3, 5, 8, [5, 4, 2])
    for mode in (True, False):
        ad.train(mode)
        out = ad(x)
        assert out.dtype == torch.bfloat16 and out.shape == (3, 12), (kind, mode)
        assert torch.isfinite(out.float()).all()
        if mode:
            out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in ad.parameters() if p.requires_grad)
    ad.eval()
    with torch.no_grad():
        expected = reference(x)
        got = ad(x).float()
    assert expected.dtype == torch.float32
    assert torch.allclose(got, expected, atol=0.1, rtol=0.1), (got - expected).abs().max()


# ---------------------------------------------------------------------------------------------
# Config rules of the instruct stage
# ---------------------------------------------------------------------------------------------


def config_error(qwen_dir: str, *overrides: str, kind: str = "qwen") -> str:
    with pytest.raises(ConfigError) as e:
        instruct_cfg(qwen_dir, *overrides, kind=kind)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_base_instruct_configs_validate(qwen_dir):
    assert instruct_cfg(qwen_dir).train.stage == "instruct"
    assert instruct_cfg(qwen_dir, kind="trm").decoder.trm.recursive is True


@pytest.mark.parametrize("pair", ["vision_text", "audio_text", "vision_audio"])
def test_instruct_stage_refuses_contrastive_pairs(qwen_dir, pair):
    msg = config_error(qwen_dir, f"loss.pairs.{pair}=0.5")
    assert msg.startswith("loss.pairs") and "instruct" in msg
    # A zero weight is no pair.
    instruct_cfg(qwen_dir, f"loss.pairs.{pair}=0.0")


def test_tokens_connector_needs_perceivers_with_matching_latents(qwen_dir):
    perceiver = "{kind: perceiver, hidden_dim: 16, num_latents: %d}"
    msg = config_error(qwen_dir, "decoder.connector_input=tokens")
    assert msg.startswith("decoder.connector_input") and "model.adapters.vision.kind" in msg
    msg = config_error(qwen_dir, "decoder.connector_input=tokens", "model.adapters.vision=" + perceiver % (N_PREFIX + 1))
    assert msg.startswith("decoder.num_prefix_tokens") and "num_latents" in msg
    # Every prefix modality: audio is still an mlp.
    msg = config_error(
        qwen_dir, "decoder.connector_input=tokens", "decoder.prefix_modalities=[vision, audio]",
        "model.adapters.vision=" + perceiver % N_PREFIX,
    )
    assert "model.adapters.audio" in msg
    cfg = instruct_cfg(
        qwen_dir, "decoder.connector_input=tokens", "decoder.prefix_modalities=[vision, audio]",
        "model.adapters.vision=" + perceiver % N_PREFIX, "model.adapters.audio=" + perceiver % N_PREFIX,
    )
    assert cfg.decoder.connector_input == "tokens"
    # A non-prefix modality's adapter may be anything.
    instruct_cfg(qwen_dir, "decoder.connector_input=tokens", "model.adapters.vision=" + perceiver % N_PREFIX)


def test_causal_baseline_refuses_recursion_settings(qwen_dir):
    msg = config_error(qwen_dir, "decoder.trm.recursive=false", kind="trm")  # the base sets h_cycles=2 etc.
    assert msg.startswith("decoder.trm.") and "recursive" in msg
    assert instruct_cfg(qwen_dir, *CAUSAL, kind="trm").decoder.trm.recursive is False
    msg = config_error(qwen_dir, *CAUSAL, "decoder.trm.h_cycles=2", kind="trm")
    assert msg.startswith("decoder.trm.h_cycles")
    msg = config_error(qwen_dir, *CAUSAL, "decoder.trm.halting=false", kind="trm")
    assert msg.startswith("decoder.trm.halting")


@pytest.mark.parametrize("prefix", ["[text]", "[vision, text]", "[]"])
def test_text_is_no_prefix_modality(qwen_dir, prefix):
    msg = config_error(qwen_dir, f"decoder.prefix_modalities={prefix}")
    assert msg.startswith("decoder.prefix_modalities")


def test_prefix_modality_needs_its_adapter(qwen_dir):
    data = instruct_dict(qwen_dir, ("decoder.prefix_modalities=[audio]",))
    del data["model"]["adapters"]["audio"]
    with pytest.raises(ConfigError, match=r"^decoder\.prefix_modalities: 'audio' needs model\.adapters\.audio"):
        config_from_dict(data)
