"""Instruction data: examples from metadata, chat-template tokenisation, label masks, truncation, collation."""

from __future__ import annotations

import json

import pytest
import torch

from edge_glass.data.instruct import CAPTION_PROMPTS, examples_from_meta
from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.decoders.qwen_chat import collate_examples, tokenize_example, tokenize_prompt
from edge_glass.data.synthetic_attributes import Attributes, all_combos, caption, qa_pairs
from edge_glass.local_models.build import build_local_models

N_PREFIX = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    # One shared directory per session: a second module's build finds the index and skips.
    models = build_local_models(tmp_path_factory.getbasetemp() / "local-models", include_real=False)
    return AutoTokenizer.from_pretrained(models["qwen2-tiny"])


def _meta(a: Attributes, key: str) -> dict:
    return {"source": "synthetic", "id": key, "attributes": a.to_json(), "qa": qa_pairs(a)}


# ---------------------------------------------------------------------------------------------
# examples_from_meta
# ---------------------------------------------------------------------------------------------


def test_examples_from_meta_caption_and_every_qa_pair():
    a = Attributes("red", "circle", "large", 0, 0)
    examples = examples_from_meta(_meta(a, "train-000001"), caption(a))
    assert [e["kind"] for e in examples] == ["caption"] + ["qa"] * 4
    assert examples[0]["answer"] == "a large red circle in the top left"
    assert examples[0]["prompt"] in CAPTION_PROMPTS["vision"]
    qa = {e["attribute"]: (e["prompt"], e["answer"]) for e in examples[1:]}
    assert qa == {
        "colour": ("What colour is the shape?", "red"),
        "shape": ("What shape is it?", "circle"),
        "size": ("How big is the shape?", "large"),
        "position": ("Where is the shape?", "top left"),
    }
    # The loader hands the metadata over as JSON text; that gives the same examples.
    assert examples_from_meta(json.dumps(_meta(a, "train-000001")), caption(a)) == examples


def test_caption_template_is_deterministic_per_sample_and_varies_across_samples():
    combos = all_combos()[:40]
    prompts = [examples_from_meta(_meta(a, f"train-{i:06d}"), caption(a))[0]["prompt"] for i, a in enumerate(combos)]
    again = [examples_from_meta(_meta(a, f"train-{i:06d}"), caption(a))[0]["prompt"] for i, a in enumerate(combos)]
    assert prompts == again
    assert set(prompts) == set(CAPTION_PROMPTS["vision"])  # all templates in use over 40 samples
    audio = examples_from_meta(_meta(combos[0], "x"), caption(combos[0]), modalities=["audio"])[0]["prompt"]
    assert audio in CAPTION_PROMPTS["audio"]


def test_examples_from_meta_single_question_answer_source_and_options():
    meta = {"source": "pixmo-qa", "id": "k", "question": "How many dogs?", "answer": "Two."}
    examples = examples_from_meta(meta, "")  # no caption -> no caption example
    assert examples == [{"prompt": "How many dogs?", "answer": "Two.", "kind": "qa", "attribute": None}]
    a = Attributes("blue", "star", "small", 1, 1)
    assert [e["kind"] for e in examples_from_meta(_meta(a, "k"), caption(a), include_qa=False)] == ["caption"]


# ---------------------------------------------------------------------------------------------
# tokenize_example
# ---------------------------------------------------------------------------------------------


def _check_layout(tokenizer, ex: dict, answer: str, n_prefix: int) -> None:
    ids, labels, positions = ex["input_ids"], ex["labels"], ex["prefix_positions"]
    assert len(ids) == len(labels) == len(ex["attention_mask"])
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # Supervised = exactly the last len(answer)+1 positions, contiguous, ending in <|im_end|>.
    supervised = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert supervised == list(range(len(ids) - len(answer_ids) - 1, len(ids)))
    assert [labels[i] for i in supervised] == [ids[i] for i in supervised]
    assert tokenizer.decode([ids[i] for i in supervised]) == answer + "<|im_end|>"
    assert ids[-1] == im_end
    # The supervised part follows the assistant turn start directly.
    head = tokenizer.decode(ids[: supervised[0]])
    assert head.endswith("<|im_start|>assistant\n")
    # Prefix slots: n contiguous positions inside the user turn, never supervised.
    assert len(positions) == n_prefix
    assert positions == list(range(positions[0], positions[0] + n_prefix))
    assert tokenizer.decode(ids[: positions[0]]).endswith("<|im_start|>user\n")
    turn_end = ids.index(im_end, positions[-1] + 1)
    assert im_start not in ids[positions[-1] + 1 : turn_end]  # still the user turn after the slots
    assert tokenizer.decode(ids[turn_end : supervised[0]]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert all(labels[p] == IGNORE_INDEX for p in positions)


def test_labels_cover_exactly_answer_and_eos(tokenizer):
    for prompt, answer in [("What colour is the shape?", "red"), ("Describe the image.", "a small blue star in the center")]:
        ex = tokenize_example(tokenizer, prompt, answer, N_PREFIX, 128)
        _check_layout(tokenizer, ex, answer, N_PREFIX)
        # The prompt text sits right after the slots, untouched.
        end = ex["prefix_positions"][-1] + 1
        assert tokenizer.decode(ex["input_ids"][end:]).startswith(prompt + "<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_part_is_exactly_the_generation_prompt(tokenizer):
    ex = tokenize_example(tokenizer, "Where is the shape?", "top left", N_PREFIX, 128)
    gen = tokenize_prompt(tokenizer, "Where is the shape?", N_PREFIX, 128)
    n_answer = sum(lab != IGNORE_INDEX for lab in ex["labels"])
    assert ex["input_ids"][:-n_answer] == gen["input_ids"]
    assert ex["prefix_positions"] == gen["prefix_positions"]


def test_system_prompt_comes_before_the_user_turn(tokenizer):
    ex = tokenize_example(tokenizer, "What shape is it?", "star", 2, 128, system_prompt="You are a helpful assistant.")
    text = tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    _check_layout(tokenizer, ex, "star", 2)


def test_truncation_cuts_only_the_start_of_the_prompt(tokenizer):
    question = "What colour is the shape?"
    long_prompt = "a large red circle in the top left " * 30 + question
    answer = "green"
    full = tokenize_example(tokenizer, long_prompt, answer, N_PREFIX, 4096)
    max_length = 40
    assert len(full["input_ids"]) > max_length
    ex = tokenize_example(tokenizer, long_prompt, answer, N_PREFIX, max_length)
    assert len(ex["input_ids"]) == max_length
    _check_layout(tokenizer, ex, answer, N_PREFIX)
    # What is left is the end of the original sequence (the question survives) after the
    # untouched head + prefix slots.
    p_end = ex["prefix_positions"][-1] + 1
    kept = max_length - p_end
    assert ex["input_ids"][p_end:] == full["input_ids"][-kept:]
    assert ex["input_ids"][:p_end] == full["input_ids"][:p_end]
    assert question in tokenizer.decode(ex["input_ids"][p_end:])
    # Generation prompts are cut the same way.
    gen = tokenize_prompt(tokenizer, long_prompt, N_PREFIX, 30)
    assert len(gen["input_ids"]) == 30 and gen["prefix_positions"] == ex["prefix_positions"]


def test_impossible_length_raises(tokenizer):
    overhead = len(tokenize_example(tokenizer, "", "red", N_PREFIX, 128)["input_ids"])  # template + prefix + answer
    tokenize_example(tokenizer, "What colour is the shape?", "red", N_PREFIX, overhead)  # just fits (prompt cut to 0)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(tokenizer, "What colour is the shape?", "red", N_PREFIX, overhead - 1)
    with pytest.raises(ValueError, match="answer"):
        tokenize_example(tokenizer, "Describe the image.", "a large red circle in the top left", N_PREFIX, 3)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_prompt(tokenizer, "What colour?", 64, 32)
    with pytest.raises(ValueError, match="placeholder"):
        tokenize_example(tokenizer, "<|edge_glass_prefix|> hi", "red", N_PREFIX, 128)


# ---------------------------------------------------------------------------------------------
# collate_examples
# ---------------------------------------------------------------------------------------------


def test_collate_pads_on_the_right_with_mask_zero_and_ignored_labels(tokenizer):
    pad = tokenizer.pad_token_id
    exs = [
        tokenize_example(tokenizer, "What colour is the shape?", "red", N_PREFIX, 128),
        tokenize_example(tokenizer, "Describe the image.", "a small blue star in the center", N_PREFIX, 128),
        tokenize_example(tokenizer, "Where?", "top left", N_PREFIX, 128),
    ]
    batch = collate_examples(exs, pad)
    lengths = [len(e["input_ids"]) for e in exs]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, (e, n) in enumerate(zip(exs, lengths)):
        assert batch["input_ids"][i, :n].tolist() == e["input_ids"]
        assert batch["labels"][i, :n].tolist() == e["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == pad).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["prefix_positions"][i].tolist() == e["prefix_positions"]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    # Supervised positions are never padding.
    assert not ((batch["labels"] != IGNORE_INDEX) & (batch["attention_mask"] == 0)).any()


def test_collate_left_padding_shifts_prefix_positions(tokenizer):
    pad = tokenizer.pad_token_id
    prompts = [tokenize_prompt(tokenizer, q, N_PREFIX, 128) for q in ("What colour is the shape?", "Where?")]
    batch = collate_examples(prompts, pad, padding_side="left")
    assert "labels" not in batch
    length = batch["input_ids"].shape[1]
    for i, p in enumerate(prompts):
        n = len(p["input_ids"])
        assert batch["input_ids"][i, length - n :].tolist() == p["input_ids"]
        assert batch["attention_mask"][i].tolist() == [0] * (length - n) + [1] * n
        shifted = batch["prefix_positions"][i].tolist()
        assert shifted == [q + length - n for q in p["prefix_positions"]]
        assert (batch["input_ids"][i, shifted] == pad).all()  # the slots, wherever they moved to
    with pytest.raises(ValueError, match="prefix slots"):
        collate_examples([prompts[0], tokenize_prompt(tokenizer, "Where?", 2, 128)], pad)
