"""QwenDecoder (tune modes, quantisation refusal, prefix injection, padding invariance), generation, EM/F1,
and a small end-to-end learning test: connector + tiny Qwen answer a question from a soft prefix."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from edge_glass.config import LoraConfig, QwenConfig
from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.decoders.qwen_chat import collate_examples, tokenize_example, tokenize_prompt
from edge_glass.decoders.generation import exact_match, generate, generate_ids, normalize_answer, token_f1
from edge_glass.decoders.qwen import QwenDecoder
from edge_glass.local_models.build import build_local_models
from edge_glass.models.connector import Connector
from edge_glass.utils.errors import UserError

N_PREFIX = 4


@contextmanager
def _one_thread():
    # A 100k-parameter model does microsecond-sized matmuls; on a shared 2-core machine two
    # intra-op threads spend most of a step waiting for each other (measured 5x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    models = build_local_models(tmp_path_factory.getbasetemp() / "local-models", include_real=False)
    return str(models["qwen2-tiny"])


def _decoder(qwen_dir: str, tune: str = "full", **lora) -> QwenDecoder:
    cfg = QwenConfig(model=qwen_dir, tune=tune, lora=LoraConfig(**lora) if lora else LoraConfig())
    return QwenDecoder(cfg)


# ---------------------------------------------------------------------------------------------
# Loading and tune modes
# ---------------------------------------------------------------------------------------------


def test_loads_model_and_chatml_tokenizer(qwen_dir):
    dec = _decoder(qwen_dir)
    assert dec.hidden_size == 64
    assert dec.tokenizer.convert_ids_to_tokens(dec.end_of_turn_id) == "<|im_end|>"
    assert dec.tokenizer.convert_ids_to_tokens(dec.pad_id) == "<|endoftext|>"


def test_tune_frozen_and_full(qwen_dir):
    frozen = _decoder(qwen_dir, "frozen")
    assert frozen.num_trainable_parameters() == 0
    full = _decoder(qwen_dir, "full")
    total = sum(p.numel() for p in full.parameters())
    assert total > 0 and full.num_trainable_parameters() == total
    assert all(p.requires_grad for p in full.parameters())


def test_tune_lora_trains_only_adapters_of_the_expected_size(qwen_dir):
    r, targets = 8, ["q_proj", "k_proj", "v_proj", "o_proj"]
    dec = _decoder(qwen_dir, "lora", r=r, alpha=16, dropout=0.0, target_modules=targets)
    trainable = {n: p for n, p in dec.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out) per adapted Linear (A is r x in, B is out x r), from the base model's own shapes.
    base = _decoder(qwen_dir, "frozen").model
    adapted = [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    assert len(adapted) == 2 * len(targets)  # 2 layers
    expected = sum(r * (m.in_features + m.out_features) for m in adapted)
    assert sum(p.numel() for p in trainable.values()) == expected == r * 896  # q 64+64, k 64+32, v 64+32, o 64+64; x2


def test_lora_unknown_target_is_a_user_error(qwen_dir):
    with pytest.raises(UserError, match="target_modules"):
        _decoder(qwen_dir, "lora", target_modules=["not_a_module"])


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="decoder.qwen.model"):
        QwenDecoder(QwenConfig(model=str(tmp_path / "nope")))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantize_without_cuda_raises_one_line_user_error(qwen_dir, monkeypatch, bits):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as err:
        QwenDecoder(QwenConfig(model=qwen_dir, quantize=bits))
    message = str(err.value)
    assert "\n" not in message
    assert bits in message and "CUDA" in message and "quantize: none" in message


# ---------------------------------------------------------------------------------------------
# Forward: prefix injection, label masking, padding invariance
# ---------------------------------------------------------------------------------------------


def _batch(tokenizer, pad_id):
    exs = [
        tokenize_example(tokenizer, "What colour is the shape?", "red", N_PREFIX, 128),
        tokenize_example(tokenizer, "Describe the image.", "a small blue star in the center", N_PREFIX, 128),
        tokenize_example(tokenizer, "Where?", "top left", N_PREFIX, 128),
    ]
    return collate_examples(exs, pad_id)


def test_prefix_embeds_land_exactly_in_the_slots(qwen_dir):
    dec = _decoder(qwen_dir)
    b = _batch(dec.tokenizer, dec.pad_id)
    prefix = torch.randn(3, N_PREFIX, dec.hidden_size)
    embeds = dec.embed(b["input_ids"], prefix, b["prefix_positions"])
    plain = dec.model.get_input_embeddings()(b["input_ids"])
    is_slot = torch.zeros(b["input_ids"].shape, dtype=torch.bool)
    is_slot[torch.arange(3).unsqueeze(1), b["prefix_positions"]] = True
    assert torch.equal(embeds[is_slot], prefix.reshape(-1, dec.hidden_size))
    assert torch.equal(embeds[~is_slot], plain[~is_slot])
    with pytest.raises(ValueError, match="prefix_embeds"):
        dec.embed(b["input_ids"], prefix[:, :2], b["prefix_positions"])


def test_loss_is_the_mean_over_answer_tokens_only(qwen_dir):
    dec = _decoder(qwen_dir).eval()
    b = _batch(dec.tokenizer, dec.pad_id)
    prefix = torch.randn(3, N_PREFIX, dec.hidden_size)
    with torch.no_grad():
        out = dec(prefix, b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"])
    logits, labels = out.logits[:, :-1], b["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert keep.sum() == sum(len(dec.tokenizer(a)["input_ids"]) + 1 for a in ["red", "a small blue star in the center", "top left"])


def test_padded_token_ids_change_nothing(qwen_dir):
    torch.manual_seed(0)
    dec = _decoder(qwen_dir).eval()
    b = _batch(dec.tokenizer, dec.pad_id)
    pad = b["attention_mask"] == 0
    assert pad.any()
    prefix = torch.randn(3, N_PREFIX, dec.hidden_size)
    other = b["input_ids"].clone()
    other[pad] = torch.randint(3, len(dec.tokenizer), (int(pad.sum()),))
    with torch.no_grad():
        ref = dec(prefix, b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"])
        new = dec(prefix, other, b["attention_mask"], b["labels"], b["prefix_positions"])
        # Control: the same change at a real prompt position does change the output.
        real = b["input_ids"].clone()
        real[0, b["prefix_positions"][0, -1] + 1] = 300
        moved = dec(prefix, real, b["attention_mask"], b["labels"], b["prefix_positions"])
    assert torch.allclose(new.loss, ref.loss, atol=1e-6)
    assert torch.allclose(new.logits[~pad], ref.logits[~pad], atol=1e-5)
    assert not torch.allclose(moved.logits[0], ref.logits[0], atol=1e-5)


def test_prefix_changes_the_loss_and_gets_gradients(qwen_dir):
    torch.manual_seed(0)
    dec = _decoder(qwen_dir, "lora", r=4, alpha=8, dropout=0.0).eval()
    b = _batch(dec.tokenizer, dec.pad_id)
    p1 = torch.randn(3, N_PREFIX, dec.hidden_size, requires_grad=True)
    p2 = torch.randn(3, N_PREFIX, dec.hidden_size)
    l1 = dec(p1, b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"]).loss
    l2 = dec(p2, b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"]).loss
    assert abs(l1.item() - l2.item()) > 1e-4
    l1.backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0  # reaches the connector through a frozen base
    assert all(p.grad is not None for n, p in dec.named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

GEN_DATA = [
    ("What colour is the shape?", "red blue"),
    ("Describe the image.", "a large green star in the center"),
    ("Where?", "top left"),
]


@pytest.fixture(scope="module")
def trained(qwen_dir):
    """The tiny LM after a few dozen steps memorising three prompt -> answer pairs (with a prefix)."""
    torch.manual_seed(0)
    dec = _decoder(qwen_dir, "full")
    tok = dec.tokenizer
    b = collate_examples([tokenize_example(tok, q, a, N_PREFIX, 64) for q, a in GEN_DATA], dec.pad_id)
    prefix = torch.randn(3, N_PREFIX, dec.hidden_size)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    with _one_thread():
        for _ in range(60):
            loss = dec(prefix, b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    prompts = [tokenize_prompt(tok, q, N_PREFIX, 64) for q, _ in GEN_DATA]
    return dec, prefix, prompts


def test_generation_returns_only_new_tokens_and_stops_at_im_end(trained):
    dec, prefix, prompts = trained
    eos = dec.end_of_turn_id
    ids = generate_ids(dec, prefix, prompts, max_new_tokens=12)
    for row, (_, answer) in zip(ids, GEN_DATA):
        # The answer then <|im_end|>, and nothing of the prompt or after the end.
        assert row == dec.tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        assert row.count(eos) == 1
    assert generate(dec, prefix, prompts, max_new_tokens=12) == [a for _, a in GEN_DATA]
    # A budget shorter than the answer cuts it without an end token.
    short = generate_ids(dec, prefix[1:2], prompts[1:2], max_new_tokens=3)[0]
    assert len(short) == 3 and eos not in short


def test_greedy_is_deterministic_and_batched_equals_one_by_one(trained):
    dec, prefix, prompts = trained
    lengths = {len(p["input_ids"]) for p in prompts}
    assert len(lengths) == 3  # different prompt lengths, so the batch is left-padded
    batched = generate_ids(dec, prefix, prompts, max_new_tokens=12)
    assert generate_ids(dec, prefix, prompts, max_new_tokens=12) == batched
    single = [generate_ids(dec, prefix[i : i + 1], prompts[i : i + 1], max_new_tokens=12)[0] for i in range(3)]
    assert single == batched
    # Reordered batch, same answers.
    order = [2, 0, 1]
    assert generate_ids(dec, prefix[order], [prompts[i] for i in order], max_new_tokens=12) == [batched[i] for i in order]


def test_generation_depends_on_the_prefix_and_restores_train_mode(trained):
    dec, prefix, prompts = trained
    dec.train()
    ref = generate_ids(dec, prefix, prompts, max_new_tokens=12)
    assert dec.training
    other = generate_ids(dec, torch.randn_like(prefix) * 3, prompts, max_new_tokens=12)
    assert other != ref
    # Sampling runs, and a fixed seed reproduces it.
    torch.manual_seed(1)
    s1 = generate(dec, prefix, prompts, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(1)
    s2 = generate(dec, prefix, prompts, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9)
    assert s1 == s2 and all(isinstance(s, str) for s in s1)


def test_answer_streams_pieces_that_make_the_answer_and_samples_reproducibly_by_seed(trained):
    from edge_glass.decoders.base import Sampling

    dec, prefix, prompts = trained
    greedy = generate(dec, prefix, prompts, max_new_tokens=12)
    for i in range(3):
        pieces: list[str] = []
        answers, _ = dec.answer(prefix[i : i + 1], {"prompts": prompts[i : i + 1]}, max_new_tokens=12, stream=pieces.append)
        assert answers == greedy[i : i + 1]
        assert "".join(pieces).strip() == greedy[i]
        # Words arrive as they are generated, not the answer in one piece at the end.
        assert len(pieces) == len(greedy[i].split())
    one = {"prompts": prompts[1:2]}
    draws = [dec.answer(prefix[1:2], one, max_new_tokens=8, sampling=Sampling(3.0, seed=s))[0][0] for s in range(6)]
    assert dec.answer(prefix[1:2], one, max_new_tokens=8, sampling=Sampling(3.0, seed=0))[0][0] == draws[0]
    assert len(set(draws)) > 1, "a hot temperature draws different answers from different seeds"
    # A cold temperature is greedy again; sampling leaves the caller's random stream alone.
    state = torch.random.get_rng_state()
    assert dec.answer(prefix[1:2], one, max_new_tokens=12, sampling=Sampling(1e-4, seed=3))[0] == greedy[1:2]
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(UserError, match="temperature"):
        Sampling(0.0)
    with pytest.raises(UserError, match="top_p"):
        Sampling(1.0, top_p=0.0)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_exact_match_and_token_f1():
    assert normalize_answer("  The  Red, Circle! ") == "red circle"
    assert exact_match("The Red.", "red") == 1.0
    assert exact_match("an apple", "Apple!") == 1.0
    assert exact_match("red circle", "red") == 0.0
    assert exact_match("theory", "ory") == 0.0  # articles only as whole words
    assert token_f1("red", "red") == 1.0
    # pred "large red circle" vs gold "a small red circle": common {red, circle}: P 2/3, R 2/3.
    assert token_f1("large red circle", "a small red circle") == pytest.approx(2 / 3)
    # pred "red red" vs gold "red": common 1, P 1/2, R 1 -> 2/3.
    assert token_f1("red red", "red") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "red") == 0.0


# ---------------------------------------------------------------------------------------------
# Learning: the prefix carries the answer
# ---------------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow", "purple"]
QUESTION = "What colour is the shape?"


@pytest.mark.slow
@pytest.mark.parametrize("tune", ["full", "lora"])
def test_connector_and_tiny_qwen_learn_to_answer_from_the_prefix(qwen_dir, tune):
    """5 classes of random 32-d vectors (class mean + noise) -> 5 colour words, through a pooled
    connector making 4 soft tokens. The question is always the same, so only the prefix can tell
    the answer: chance is 20 %. Held-out vectors are fresh draws; EM needs the word and <|im_end|>."""
    torch.manual_seed(0)
    lora = dict(r=8, alpha=16, dropout=0.0) if tune == "lora" else {}
    dec = _decoder(qwen_dir, tune, **lora)
    tok = dec.tokenizer
    gen = torch.Generator().manual_seed(1)
    dim = 32
    means = torch.randn(len(COLOURS), dim, generator=gen)

    def draw(n):
        y = torch.randint(0, len(COLOURS), (n,), generator=gen)
        return means[y] + 0.3 * torch.randn(n, dim, generator=gen), y

    connector = Connector(dim, dec.hidden_size, N_PREFIX, "mlp", "pooled")
    examples = {c: tokenize_example(tok, QUESTION, c, N_PREFIX, 64) for c in COLOURS}
    prompt = tokenize_prompt(tok, QUESTION, N_PREFIX, 64)
    params = [p for p in [*dec.parameters(), *connector.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    x_val, y_val = draw(100)
    gold = [tok(COLOURS[c], add_special_tokens=False)["input_ids"] + [dec.end_of_turn_id] for c in y_val.tolist()]

    def held_out_em() -> float:
        with torch.no_grad():
            prefix = connector.eval()(x_val)
        connector.train()
        ids = generate_ids(dec, prefix, [prompt] * len(gold), max_new_tokens=4)
        return sum(p == g for p, g in zip(ids, gold)) / len(gold)

    em, history = held_out_em(), []
    assert em < 0.5  # untrained: no better than a constant answer
    with _one_thread():
        for step in range(1, 201):
            x, y = draw(64)
            b = collate_examples([examples[COLOURS[c]] for c in y.tolist()], dec.pad_id)
            loss = dec(connector(x), b["input_ids"], b["attention_mask"], b["labels"], b["prefix_positions"]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 25 == 0:
                em = held_out_em()
                history.append((step, round(loss.item(), 3), em))
                if em >= 0.95:
                    break
    assert em >= 0.8, f"held-out greedy EM {em:.2f} after training; (step, loss, EM): {history}"
    texts = generate(dec, connector.eval()(x_val[:10]).detach(), [prompt] * 10, max_new_tokens=4)
    assert sum(exact_match(t, COLOURS[c]) for t, c in zip(texts, y_val[:10].tolist())) >= 8
