"""Tiny Recursive Model decoder: the recursion really recurses, gradients reach only the last cycle,
the carry is detached between supervision steps, padding is invisible, and halting works. Learning
on real features, against the causal baseline, is tests/test_experiments.py's (the trimodal_trm twin)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edge_glass.config import TRMConfig
from edge_glass.decoders.causal_baseline import CausalBaseline
from edge_glass.decoders.trm import (
    IGNORE_INDEX,
    TRM,
    TRMBatch,
    answer_targets,
    cut_at_eos,
    deep_supervision_loss,
    answers_exact,
    pad_questions,
    supervision_loss,
)

H = 32  # width of the fast tests


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_glass.local_models.build import build_local_models

    out = tmp_path_factory.mktemp("trm-local")
    return build_local_models(out, include_real=False, seed=0)["qwen2-tiny"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def one_thread():
    """Two shared cores: one intra-op thread is several times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(tokenizer_dir: Path, **kw) -> TRMConfig:
    base = dict(hidden_dim=H, num_layers=2, num_heads=4, h_cycles=2, l_cycles=2, n_sup=3, max_answer_len=5)
    base.update(kw)
    return TRMConfig(tokenizer=str(tokenizer_dir), **base)


def make_batch(tok, b: int = 4, p: int = 2, seed: int = 0) -> TRMBatch:
    g = torch.Generator().manual_seed(seed)
    questions = [tok("What colour is the shape?")["input_ids"], tok("What shape?")["input_ids"]]
    answers = [tok("red")["input_ids"], tok("grey")["input_ids"], tok("heart")["input_ids"], tok("blue")["input_ids"]]
    qids, qmask = pad_questions([questions[i % 2] for i in range(b)], tok.pad_token_id)
    labels = answer_targets([answers[i % 4] for i in range(b)], 5, tok.eos_token_id)
    return TRMBatch(qids, qmask, labels, prefix=torch.randn(b, p, H, generator=g))


def count_f(model: TRM) -> list[bool]:
    """Registers a hook on the tiny network f; the list gets one entry (output.requires_grad) per call."""
    calls: list[bool] = []
    model.net.register_forward_hook(lambda mod, args, out: calls.append(out.requires_grad))
    return calls


# --------------------------------------------------------------------------------------------
# Targets and helpers
# --------------------------------------------------------------------------------------------


def test_answer_targets_answer_eos_then_ignored():
    labels = answer_targets([[5, 6], [7], [], [1, 2, 3, 4, 5, 6]], 4, eos_id=2)
    assert labels.tolist() == [
        [5, 6, 2, IGNORE_INDEX],
        [7, 2, IGNORE_INDEX, IGNORE_INDEX],
        [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [1, 2, 3, 2],  # cut to A-1 tokens so the EOS always fits
    ]
    assert labels.dtype == torch.long


def test_cut_at_eos_and_answers_exact():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    cut = cut_at_eos(ids, eos_id=2, pad_id=0)
    assert cut.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    labels = answer_targets([[5], [5, 6, 7], []], 4, eos_id=2)
    # Row 0 matches on answer+EOS (what follows is unsupervised); row 1 never emits EOS; row 2 matches.
    assert answers_exact(cut, labels).tolist() == [True, False, True]


def test_supervision_loss_halting_target_is_exact_correctness():
    labels = answer_targets([[5, 6], [7]], 4, eos_id=2)
    right = F.one_hot(labels.clamp(min=0), 10).float() * 20.0
    wrong = right.clone()
    wrong[1, 0] = F.one_hot(torch.tensor(8), 10).float() * 20.0
    q = torch.zeros(2)
    _, stats = supervision_loss(right, q, labels)
    assert stats["exact"] == 1.0 and stats["halt_acc"] == 0.0  # q = 0 means "don't halt" for both
    _, stats = supervision_loss(wrong, torch.tensor([5.0, -5.0]), labels)
    assert stats["exact"] == 0.5 and stats["halt_acc"] == 1.0
    assert stats["halt_bce"] < 0.01


# --------------------------------------------------------------------------------------------
# Recursion structure
# --------------------------------------------------------------------------------------------


def test_shapes(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir), tokenizer)
    batch = make_batch(tokenizer, b=3, p=2)
    carry, logits, q = model(model.initial_carry(3), batch.prefix, batch.question_ids, batch.question_mask)
    assert logits.shape == (3, 5, len(tokenizer))
    assert q.shape == (3,)
    assert carry.y.shape == carry.z.shape == (3, 5, H)
    answers, halt_steps = model.predict(batch.prefix, batch.question_ids, batch.question_mask)
    assert answers.shape == (3, 5) and answers.dtype == torch.long
    assert halt_steps.shape == (3,)
    # No prefix at all also works (text-only questions).
    _, logits, _ = model(model.initial_carry(3), None, batch.question_ids, batch.question_mask)
    assert logits.shape == (3, 5, len(tokenizer))


def test_interactive_answers_refuse_sampling_and_stream_whole(tokenizer_dir, tokenizer):
    from edge_glass.decoders.base import Sampling
    from edge_glass.utils.errors import UserError

    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir), tokenizer).eval()
    batch = make_batch(tokenizer, b=1, p=2)
    inputs = {"question_ids": batch.question_ids, "question_mask": batch.question_mask}
    with pytest.raises(UserError, match="trm decoder .* greedily"):
        model.answer(batch.prefix, inputs, max_new_tokens=5, sampling=Sampling(0.7))
    pieces: list[str] = []
    answers, _ = model.answer(batch.prefix, inputs, max_new_tokens=5, stream=pieces.append)
    assert pieces == answers  # one piece: the TRM has no token-by-token order to show


@pytest.mark.parametrize("h_cycles,l_cycles", [(1, 1), (3, 4), (2, 6)])
def test_f_applications_per_step(tokenizer_dir, tokenizer, h_cycles, l_cycles):
    model = TRM(make_cfg(tokenizer_dir, h_cycles=h_cycles, l_cycles=l_cycles), tokenizer)
    calls = count_f(model)
    batch = make_batch(tokenizer)
    model(model.initial_carry(4), batch.prefix, batch.question_ids, batch.question_mask)
    assert len(calls) == h_cycles * (l_cycles + 1)
    # Only the last cycle (L latent updates + 1 answer update) runs with gradient.
    assert calls == [False] * ((h_cycles - 1) * (l_cycles + 1)) + [True] * (l_cycles + 1)


def test_recursion_changes_the_output(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    shallow = TRM(make_cfg(tokenizer_dir, h_cycles=1, l_cycles=1), tokenizer)
    deep = TRM(make_cfg(tokenizer_dir, h_cycles=3, l_cycles=4), tokenizer)
    deep.load_state_dict(shallow.state_dict())  # same weights: only the recursion depth differs
    batch = make_batch(tokenizer)
    args = (batch.prefix, batch.question_ids, batch.question_mask)
    c1, l1, _ = shallow(shallow.initial_carry(4), *args)
    c2, l2, _ = deep(deep.initial_carry(4), *args)
    assert (l1 - l2).abs().max() > 1e-3
    assert (c1.z - c2.z).abs().max() > 1e-3
    # ...and a second supervision step continues from the carry rather than starting over.
    _, l3, _ = deep(c2, *args)
    assert (l3 - l2).abs().max() > 1e-3


def test_gradient_only_through_last_cycle(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, h_cycles=3, l_cycles=2), tokenizer)
    batch = make_batch(tokenizer)
    args = (batch.prefix, batch.question_ids, batch.question_mask)
    carry = model.initial_carry(4)

    _, logits, q = model(carry, *args)
    loss, _ = supervision_loss(logits, q, batch.labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # Manual: the first H-1 cycles from the same start, detached, then one cycle with gradient.
    ctx = model.encode_context(*args)
    y, z = carry.y, carry.z
    for _ in range(2):
        y, z = model.cycle(ctx, y, z)
    y, z = model.cycle(ctx, y.detach(), z.detach())
    logits2, q2 = model.outputs(y)
    loss2, _ = supervision_loss(logits2, q2, batch.labels)
    loss2.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # The same loss with gradient through ALL cycles differs, so the comparison can fail.
    ctx = model.encode_context(*args)
    y, z = carry.y, carry.z
    for _ in range(3):
        y, z = model.cycle(ctx, y, z)
    logits3, q3 = model.outputs(y)
    supervision_loss(logits3, q3, batch.labels)[0].backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert torch.allclose(loss, loss2)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any((full[n] - want[n]).abs().max() > 1e-5 for n in want if "net." in n)
    # The init vectors are consumed by the no-grad cycles, so they get no gradient at all.
    assert "y_init" not in got and "z_init" not in got


def test_carry_detached_between_supervision_steps(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, h_cycles=1, l_cycles=2), tokenizer)
    batch = make_batch(tokenizer)
    p1 = batch.prefix.clone().requires_grad_(True)
    p2 = batch.prefix.clone().requires_grad_(True)
    carry1, logits1, _ = model(model.initial_carry(4), p1, batch.question_ids, batch.question_mask)
    assert carry1.y.grad_fn is None and carry1.z.grad_fn is None
    assert not carry1.y.requires_grad and not carry1.z.requires_grad
    assert logits1.requires_grad  # step 1's own graph exists...
    _, logits2, q2 = model(carry1, p2, batch.question_ids, batch.question_mask)
    supervision_loss(logits2, q2, batch.labels)[0].backward()
    assert p2.grad is not None and p2.grad.abs().sum() > 0
    assert p1.grad is None  # ...but step 2's loss never reaches it
    # With h_cycles=1 the init vectors sit inside step 1's grad cycle: step 2 must not reach them.
    assert model.y_init.grad is None and model.z_init.grad is None


def test_deep_supervision_loss_averages_steps(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, n_sup=3), tokenizer)
    calls = count_f(model)
    batch = make_batch(tokenizer)
    loss, stats = deep_supervision_loss(model, batch)
    assert len(calls) == 3 * 2 * 3  # n_sup * H * (L + 1)
    # Recompute the three step losses by hand, carrying detached state.
    carry, total = model.initial_carry(4), 0.0
    for _ in range(3):
        carry, logits, q = model(carry, batch.prefix, batch.question_ids, batch.question_mask)
        total = total + supervision_loss(logits, q, batch.labels)[0]
    torch.testing.assert_close(loss, total / 3)
    loss.backward()
    assert model.head.weight.grad is not None


def test_train_step_one_optimizer_step_per_supervision_step(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, n_sup=4, halting=False), tokenizer)
    batch = make_batch(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen = []

    def step_fn(loss):
        seen.append(loss.detach())
        loss.backward()
        opt.step()
        opt.zero_grad()

    out = model.train_step(batch, step_fn)
    assert out["steps"] == 4 and len(seen) == 4
    assert out["halt_steps"].tolist() == [4] * 4


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------


def test_padding_is_invisible(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    for kind in (TRM, CausalBaseline):
        model = kind(make_cfg(tokenizer_dir), tokenizer).eval()
        batch = make_batch(tokenizer)
        assert not batch.question_mask.all()  # the batch really has padding
        other = batch.question_ids.masked_fill(~batch.question_mask, 77)
        # Extra padding columns (with junk ids) must not change anything either (compact RoPE positions).
        wider = torch.cat([other, torch.full((4, 3), 123)], dim=1)
        wider_mask = torch.cat([batch.question_mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
        if kind is TRM:
            run = lambda ids, mask: model(model.initial_carry(4), batch.prefix, ids, mask)[1]  # noqa: E731
        else:
            run = lambda ids, mask: model.loss(batch.prefix, ids, mask, batch.labels)[1]  # noqa: E731
        ref = run(batch.question_ids, batch.question_mask)
        torch.testing.assert_close(run(other, batch.question_mask), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(run(wider, wider_mask), ref, rtol=1e-4, atol=1e-4)
        # Control: changing a *real* question token does change the output.
        real = batch.question_ids.clone()
        real[:, 0] = 77
        assert (run(real, batch.question_mask) - ref).abs().max() > 1e-4


def test_baseline_is_causal_and_decodes_greedily(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = CausalBaseline(make_cfg(tokenizer_dir), tokenizer).eval()
    batch = make_batch(tokenizer)
    args = (batch.prefix, batch.question_ids, batch.question_mask)
    ids = torch.randint(3, len(tokenizer), (4, 5))
    mask = torch.ones(4, 5, dtype=torch.bool)
    ref = model(*args, ids, mask)
    changed = ids.clone()
    changed[:, 2] = 7  # answer token 2 is the input of slot 3
    out = model(*args, changed, mask)
    torch.testing.assert_close(out[:, :3], ref[:, :3], rtol=0, atol=1e-5)
    assert (out[:, 3:] - ref[:, 3:]).abs().max() > 1e-4
    # Greedy decoding = teacher forcing on its own output (recompute decoding, no cache to drift).
    pred = model.predict(*args)
    forced = model(*args, pred, mask).argmax(-1)
    for row_p, row_f in zip(pred.tolist(), forced.tolist()):
        n = row_p.index(model.eos_id) + 1 if model.eos_id in row_p else len(row_p)
        assert row_p[:n] == row_f[:n]


# --------------------------------------------------------------------------------------------
# Halting
# --------------------------------------------------------------------------------------------


def test_halting_mechanism_reports_steps(tokenizer_dir, tokenizer):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, n_sup=4), tokenizer)
    calls = count_f(model)
    batch = make_batch(tokenizer)
    args = (batch.prefix, batch.question_ids, batch.question_mask)
    _, halt = model.predict(*args)  # q head starts at bias -5: never halts
    assert halt.tolist() == [4] * 4
    assert len(calls) == 4 * 2 * 3
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)
    calls.clear()
    _, halt = model.predict(*args)
    assert halt.tolist() == [1] * 4
    assert len(calls) == 1 * 2 * 3  # stopped after one supervision step
    _, halt = model.predict(*args, halting=False)
    assert halt.tolist() == [4] * 4
    # Per-sample: q_halt > 0 exactly for samples whose answer-state mean points along w.
    with torch.no_grad():
        model.q_head.bias.zero_()
        model.q_head.weight.normal_()
    answers, halt = model.predict(*args)
    assert ((halt >= 1) & (halt <= 4)).all()


def overfit(model: TRM, batch: TRMBatch, iters: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def step_fn(loss):
        loss.backward()
        opt.step()
        opt.zero_grad()

    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        model.train_step(batch, step_fn, generator=g)


def test_trained_model_halts_early(tokenizer_dir, tokenizer, one_thread):
    torch.manual_seed(0)
    model = TRM(make_cfg(tokenizer_dir, n_sup=4, h_cycles=2, l_cycles=1), tokenizer)
    batch = make_batch(tokenizer, b=8)
    answers, halt = model.predict(batch.prefix, batch.question_ids, batch.question_mask)
    assert halt.tolist() == [4] * 8 and not answers_exact(answers, batch.labels).all()
    overfit(model, batch, iters=60)
    answers, halt = model.predict(batch.prefix, batch.question_ids, batch.question_mask)
    assert answers_exact(answers, batch.labels).all()
    assert ((halt >= 1) & (halt <= 4)).all()
    assert halt.float().mean() < 2.0, halt.tolist()
