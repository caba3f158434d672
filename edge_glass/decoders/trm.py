"""Tiny Recursive Model (TRM) answer decoder, after Jolicoeur-Martineau 2025, "Less is More:
Recursive Reasoning with Tiny Networks" (reference code: SamsungSAILMontreal/TinyRecursiveModels).

One tiny non-causal transformer `f` is applied recursively to an answer state `y` and a latent
`z`, both [B, A, H] over a fixed answer length A = `max_answer_len`; the whole answer is predicted
in parallel (answer tokens, then EOS, then unsupervised positions).

    context x   = [RMSNorm(prefix) ; scale * embed(question)]         [B, C, H] + key mask
    one cycle   : L times  z <- f(x | y + z)      (x visible through attention)
                  once     y <- f(y + z)          (no x: this is how f tells the two updates apart)
    one step    : H cycles, the first H-1 under torch.no_grad(), the last with gradient
                  (the paper's one-step gradient approximation); logits = head(y), q = q_head(mean(y))
    deep supervision: n_sup steps; the carry (y, z) is detached between steps

How x enters (a deliberate difference from the paper). The paper adds x + y + z elementwise, which
needs x to be as long as the answer (a puzzle grid in, a grid out). Here x (prefix soft tokens plus
a variable-length, padded question) and the answer have different lengths, so x is *concatenated
along the sequence*: f runs over [x ; y + z] with a key-padding mask, and only the answer positions
of its output are kept; x is re-injected fresh (never updated) at every z-update, exactly as the
paper re-adds x at every z-update. The y-update runs f over [y + z] alone, as in the paper.

The tiny network f. `num_layers` pre-norm blocks (RMSNorm -> multi-head self-attention with RoPE ->
residual; RMSNorm -> SwiGLU -> residual), then a final RMSNorm. The reference uses post-norm blocks,
whose output is normalised by construction; with the pre-norm blocks asked for here the residual
stream would otherwise grow with every one of the H*(L+1)*n_sup applications, so f ends with an
RMSNorm and its output (the new y or z) always has a controlled scale.

Positions (RoPE). Position ids are compacted over the valid tokens (cumsum of the key mask), and the
answer slots follow the last valid context token. Masked keys plus compact positions make the output
independent both of the ids at padded question positions and of how much padding a batch has.

Other choices, following the reference code where it applies:
* Token embeddings are initialised with std 1/sqrt(H) and multiplied by sqrt(H) (unit-scale inputs,
  larger effective learning rate on the table); the output head is *untied* (as in the reference).
* The prefix is given as embeddings [B, P, H] (from a connector) and passes through a learnable
  RMSNorm, so its scale matches the question embeddings whatever the connector produces.
* y and z start from init vectors [H] broadcast over [B, A] (trunc-normal, std 1). The reference
  keeps them as fixed buffers; here they are parameters, but gradient reaches them only when
  h_cycles == 1 (otherwise they are consumed by no-grad cycles), so in practice they stay fixed.
* Halting: q_halt = Linear(H -> 1)(mean over the A answer slots of y), weight 0 and bias -5 at init
  (the reference's "almost never halt" start); trained with BCE (weight 0.5, as the reference's
  no-ACT-continue loss) against "every supervised answer position is argmax-correct", which is the
  same as greedy exact match of the EOS-cut answer. At inference a sample stops at the first step
  where sigmoid(q_halt) > 0.5 (or after n_sup steps); its step number (1-based) is reported.

Loss of one supervision step (`supervision_loss`): token-mean cross-entropy over the labelled answer
positions (answer tokens and the EOS; -100 elsewhere) + 0.5 * BCE(q_halt, exact-correct).

Training, two ways (both detach the carry between supervision steps):
* `TRM.train_step(batch, step_fn)`: the paper's way, one optimizer step per supervision step;
  `step_fn(loss)` must backward, step and zero the gradients. A sample whose q_halt says halt
  leaves the later steps' losses (the reference swaps in a new sample instead), with the
  reference's 10 % exploration (a random minimum of 2..n_sup steps); the loop ends when all halted.
* `deep_supervision_loss(model, batch)`: the n_sup step losses *averaged* into one loss for one
  optimizer step (for a trainer that owns backward/step, e.g. DeepSpeed); always runs n_sup steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_glass.config import TRMConfig
from edge_glass.decoders.base import IGNORE_INDEX, Sampling
from edge_glass.utils.errors import UserError

HALT_LOSS_WEIGHT = 0.5
"""Weight of the halting BCE in a supervision step's loss (the reference's 0.5)."""
MLP_EXPANSION = 4.0
"""SwiGLU width = expansion * H * 2/3 (rounded up to a multiple of 8), as in the reference."""
ROPE_THETA = 10000.0


# --------------------------------------------------------------------------------------------
# Building blocks (shared with the causal baseline)
# --------------------------------------------------------------------------------------------


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, 1, S, head_dim] for integer positions [B, S]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, hd]
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


def compact_positions(mask: Tensor) -> Tensor:
    """Position ids that count only valid (mask=True) tokens: padding never shifts a position."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class Attention(nn.Module):
    """Multi-head self-attention with RoPE; `attn_mask` [B, 1, S, S] or [B, 1, 1, S], True = attend."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden_dim {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor) -> Tensor:
        b, s, _ = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, expansion: float = MLP_EXPANSION) -> None:
        super().__init__()
        inter = -(-round(expansion * hidden * 2 / 3) // 8) * 8
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm -> attention -> residual; RMSNorm -> SwiGLU -> residual."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.attn = Attention(hidden, num_heads)
        self.mlp_norm = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = SwiGLU(hidden)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor) -> Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin, attn_mask)
        return h + self.mlp(self.mlp_norm(h))


class TinyNet(nn.Module):
    """The tiny network f: `num_layers` blocks and a final RMSNorm (so its output has a fixed scale)."""

    def __init__(self, hidden: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(hidden, num_heads) for _ in range(num_layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h, cos, sin, attn_mask)
        return self.norm(h)


class TokenEmbedding(nn.Module):
    """Embedding with init std 1/sqrt(H), scaled by sqrt(H) on lookup (as the reference)."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.scale = math.sqrt(hidden)
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.trunc_normal_(self.weight, std=1.0 / self.scale, a=-2.0 / self.scale, b=2.0 / self.scale)

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale * F.embedding(ids, self.weight)


def build_backbone(module: nn.Module, cfg: TRMConfig, tokenizer=None) -> None:
    """What the TRM and its causal baseline share: tokenizer, embeddings, prefix norm, the tiny
    network and an untied output head, so the comparison differs only in how f is applied."""
    module.cfg = cfg
    module.tokenizer = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    module.vocab_size = len(module.tokenizer)
    module.eos_id, module.pad_id = special_ids(module.tokenizer)
    h = cfg.hidden_dim
    module.head_dim = h // cfg.num_heads
    module.embed = TokenEmbedding(module.vocab_size, h)
    module.prefix_norm = nn.RMSNorm(h, eps=1e-6)
    module.net = TinyNet(h, cfg.num_layers, cfg.num_heads)
    module.head = nn.Linear(h, module.vocab_size, bias=False)


def load_tokenizer(name: str):
    """The tokenizer of `TRMConfig.tokenizer` (hub id or local directory), via AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id) of a tokenizer; pad falls back to eos when the tokenizer has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the TRM tokenizer needs an eos token: answers end with it")
    pad = tokenizer.pad_token_id
    return eos, eos if pad is None else pad


def build_context(
    prefix: Tensor | None, prefix_mask: Tensor | None, question_emb: Tensor, question_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """[prefix ; question] embeddings [B, C, H] and their key mask [B, C] (bool, True = valid)."""
    qmask = question_mask.bool()
    if prefix is None:
        return question_emb, qmask
    pmask = (
        torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device) if prefix_mask is None else prefix_mask.bool()
    )
    return torch.cat([prefix, question_emb], dim=1), torch.cat([pmask, qmask], dim=1)


def cut_at_eos(ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Keep each row up to and including its first EOS; every position after it becomes pad_id."""
    is_eos = ids == eos_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ids.masked_fill(after, pad_id)


def answer_targets(
    answer_ids_list: Sequence[Sequence[int]], A: int, eos_id: int, pad_id: int = IGNORE_INDEX
) -> Tensor:
    """Fixed-length labels [B, A]: the answer tokens, then EOS, then `pad_id` (-100: ignored).

    An answer longer than A-1 tokens is cut to its first A-1 tokens, so the EOS always fits (the
    model cannot emit more than A tokens anyway).
    """
    labels = torch.full((len(answer_ids_list), A), pad_id, dtype=torch.long)
    for i, ids in enumerate(answer_ids_list):
        ids = list(ids)[: A - 1] + [eos_id]
        labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return labels


def pad_questions(question_ids_list: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token-id lists into (ids [B, Q], mask [B, Q] bool)."""
    q = max(1, max((len(ids) for ids in question_ids_list), default=1))
    ids = torch.full((len(question_ids_list), q), pad_id, dtype=torch.long)
    mask = torch.zeros((len(question_ids_list), q), dtype=torch.bool)
    for i, row in enumerate(question_ids_list):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def decode_answers(tokenizer, answer_ids: Tensor, eos_id: int) -> list[str]:
    """Answer strings: each row's tokens before its first EOS (all of them if it has none)."""
    out = []
    for row in answer_ids.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(tokenizer.decode(row))
    return out


def answers_exact(answer_ids: Tensor, labels: Tensor) -> Tensor:
    """[B] bool: the prediction equals the label at every labelled position (answer + EOS)."""
    valid = labels != IGNORE_INDEX
    return ((answer_ids == labels) | ~valid).all(-1)


def refuse_sampling(kind: str, sampling: Sampling | None, why: str) -> None:
    """One line for a sampled answer asked of a decoder trained and evaluated greedily only."""
    if sampling is not None:
        raise UserError(f"the {kind} decoder {why} and answers greedily; ask without a temperature")


def stream_whole(answers: list[str], stream: Callable[[str], None] | None) -> list[str]:
    """The finished answer to `stream` in one piece (no token-by-token generation to show)."""
    if stream is not None:
        for a in answers:
            stream(a)
    return answers


class PlainPromptIO:
    """The decoder contract's text side for the TRM and its causal baseline (decoders/base.py).

    Neither has a chat format, so the prompt is tokenised plain and right-padded
    (`question_ids`, `question_mask`); the answer becomes fixed-length labels
    [N, max_answer_len] (answer, EOS, -100) that both predict in their own way.
    """

    @property
    def width(self) -> int:
        return self.cfg.hidden_dim

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_examples(self, examples: Sequence[dict], num_prefix_tokens: int) -> dict[str, Tensor]:
        question_ids, question_mask = pad_questions([self._encode(e["prompt"]) for e in examples], self.pad_id)
        labels = answer_targets([self._encode(e["answer"]) for e in examples], self.cfg.max_answer_len, self.eos_id)
        return {"question_ids": question_ids, "question_mask": question_mask, "labels": labels}

    def generation_inputs(self, examples: Sequence[dict], num_prefix_tokens: int) -> dict:
        return {}  # it answers from the training inputs' question alone

    def eval_loss(self, prefix: Tensor, batch: dict) -> tuple[float, int]:
        # Both losses are means over examples (the TRM's over its supervision steps too).
        loss, _ = self.batch_loss(prefix, batch)
        return float(loss) * len(batch["labels"]), len(batch["labels"])


# --------------------------------------------------------------------------------------------
# The TRM
# --------------------------------------------------------------------------------------------


@dataclass
class TRMCarry:
    """The recursive state carried between supervision steps: answer y and latent z, [B, A, H]."""

    y: Tensor
    z: Tensor

    def detach(self) -> "TRMCarry":
        return TRMCarry(self.y.detach(), self.z.detach())


@dataclass
class TRMBatch:
    """One training batch. `prefix` is [B, P, H] embeddings, None (no prefix), or a zero-argument
    callable returning them: `train_step` calls it once per supervision step, so a trainable
    connector gets a fresh graph (and its updated weights) for every optimizer step."""

    question_ids: Tensor
    question_mask: Tensor
    labels: Tensor
    prefix: Tensor | Callable[[], Tensor] | None = None
    prefix_mask: Tensor | None = None

    def get_prefix(self) -> Tensor | None:
        return self.prefix() if callable(self.prefix) else self.prefix


@dataclass
class _Context:
    x: Tensor  # [B, C, H]
    ctx_cos: Tensor
    ctx_sin: Tensor  # [B, 1, C + A, hd]
    ctx_mask: Tensor  # [B, 1, 1, C + A]
    ans_cos: Tensor
    ans_sin: Tensor  # [B, 1, A, hd]
    ans_mask: Tensor  # [B, 1, 1, A]


def supervision_loss(
    logits: Tensor, q_halt_logit: Tensor | None, labels: Tensor, sample_mask: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one supervision step: token-mean CE over labelled positions (+ 0.5 * halting BCE).

    The halting target is "every labelled position is argmax-correct" (computed without gradient).
    `sample_mask` [B] (bool) restricts the loss to some samples (`train_step` drops samples that
    already halted). Returns (loss, stats) with detached stats over the included samples: ce,
    token_acc, exact (fraction of samples exactly right), halt_bce and halt_acc (with a q head), loss.
    """
    if sample_mask is not None:
        labels = labels.masked_fill(~sample_mask[:, None], IGNORE_INDEX)
        keep = sample_mask
    else:
        keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    valid = labels != IGNORE_INDEX
    if valid.any():
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    else:  # nothing to supervise: a zero that still has a graph, so backward() works
        ce = logits.sum() * 0.0
    with torch.no_grad():
        pred = logits.argmax(-1)
        correct = answers_exact(pred, labels)
        n = keep.sum().clamp(min=1)
        token_acc = ((pred == labels) & valid).sum() / valid.sum().clamp(min=1)
    stats = {"ce": ce.detach(), "token_acc": token_acc, "exact": (correct & keep).sum() / n}
    loss = ce
    if q_halt_logit is not None:
        bce = F.binary_cross_entropy_with_logits(q_halt_logit.float(), correct.float(), reduction="none")
        bce = (bce * keep).sum() / n
        loss = loss + HALT_LOSS_WEIGHT * bce
        stats["halt_bce"] = bce.detach()
        stats["halt_acc"] = (((q_halt_logit.detach() > 0) == correct) & keep).sum() / n
    stats["loss"] = loss.detach()
    return loss, stats


class TRM(PlainPromptIO, nn.Module):
    """Tiny Recursive Model decoder over a connector prefix and a question; see the module doc.

    `tokenizer` defaults to AutoTokenizer.from_pretrained(cfg.tokenizer); its vocabulary size sets
    the embedding table and output head, its eos ends answers and its pad (eos if none) fills
    predicted positions after the EOS.
    """

    def __init__(self, cfg: TRMConfig, tokenizer=None) -> None:
        super().__init__()
        build_backbone(self, cfg, tokenizer)
        h = cfg.hidden_dim
        self.q_head = nn.Linear(h, 1)
        self.y_init = nn.Parameter(nn.init.trunc_normal_(torch.empty(h), std=1.0, a=-2.0, b=2.0))
        self.z_init = nn.Parameter(nn.init.trunc_normal_(torch.empty(h), std=1.0, a=-2.0, b=2.0))
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    # -- state ---------------------------------------------------------------------------------

    def initial_carry(self, batch_size: int) -> TRMCarry:
        shape = (batch_size, self.cfg.max_answer_len, self.cfg.hidden_dim)
        return TRMCarry(self.y_init.expand(shape), self.z_init.expand(shape))

    def encode_context(
        self, prefix: Tensor | None, question_ids: Tensor, question_mask: Tensor, prefix_mask: Tensor | None = None
    ) -> _Context:
        """Embed [prefix ; question] and precompute RoPE tables and masks shared by all cycles."""
        dtype = self.y_init.dtype
        q_emb = self.embed(question_ids)
        if prefix is not None:
            if prefix.shape[-1] != self.cfg.hidden_dim:
                raise ValueError(f"prefix width {prefix.shape[-1]} != TRM hidden_dim {self.cfg.hidden_dim}")
            prefix = self.prefix_norm(prefix.to(dtype))
        x, xmask = build_context(prefix, prefix_mask, q_emb, question_mask)
        b, a = x.shape[0], self.cfg.max_answer_len
        amask = torch.ones(b, a, dtype=torch.bool, device=x.device)
        full = torch.cat([xmask, amask], dim=1)
        pos = compact_positions(full)  # answer slots follow the last valid context token
        ctx_cos, ctx_sin = rope_cos_sin(pos, self.head_dim)
        return _Context(
            x=x,
            ctx_cos=ctx_cos,
            ctx_sin=ctx_sin,
            ctx_mask=full[:, None, None, :],
            ans_cos=ctx_cos[:, :, -a:],
            ans_sin=ctx_sin[:, :, -a:],
            ans_mask=amask[:, None, None, :],
        )

    def f_latent(self, ctx: _Context, h: Tensor) -> Tensor:
        """z-update input h = y + z [B, A, H]; f runs over [x ; h], only the answer slots come out."""
        out = self.net(torch.cat([ctx.x, h], dim=1), ctx.ctx_cos, ctx.ctx_sin, ctx.ctx_mask)
        return out[:, ctx.x.shape[1]:]

    def f_answer(self, ctx: _Context, h: Tensor) -> Tensor:
        """y-update input h = y + z [B, A, H]; f runs over the answer slots alone (no x)."""
        return self.net(h, ctx.ans_cos, ctx.ans_sin, ctx.ans_mask)

    def cycle(self, ctx: _Context, y: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """One outer cycle: L latent updates z <- f(x, y + z), then y <- f(y + z)."""
        for _ in range(self.cfg.l_cycles):
            z = self.f_latent(ctx, y + z)
        y = self.f_answer(ctx, y + z)
        return y, z

    def outputs(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [B, A, V], q_halt_logit [B]) from an answer state."""
        return self.head(y), self.q_head(y.mean(dim=1)).squeeze(-1)

    # -- one supervision step --------------------------------------------------------------------

    def forward(
        self,
        carry: TRMCarry,
        prefix: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        prefix_mask: Tensor | None = None,
        *,
        context: _Context | None = None,
    ) -> tuple[TRMCarry, Tensor, Tensor]:
        """ONE supervision step: H cycles (H-1 without grad, the last with grad).

        Returns (new carry, detached; logits [B, A, V]; q_halt_logit [B]). `context` (from
        `encode_context`) may be passed to reuse it across steps when no gradient needs it.
        """
        ctx = context if context is not None else self.encode_context(prefix, question_ids, question_mask, prefix_mask)
        y, z = carry.y, carry.z
        with torch.no_grad():
            for _ in range(self.cfg.h_cycles - 1):
                y, z = self.cycle(ctx, y, z)
        y, z = self.cycle(ctx, y, z)
        logits, q_halt = self.outputs(y)
        return TRMCarry(y.detach(), z.detach()), logits, q_halt

    def step(
        self, carry: TRMCarry, batch: TRMBatch, sample_mask: Tensor | None = None
    ) -> tuple[TRMCarry, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """One supervision step on a batch: (new carry, logits, q_halt_logit, loss, stats)."""
        carry, logits, q_halt = self(carry, batch.get_prefix(), batch.question_ids, batch.question_mask, batch.prefix_mask)
        loss, stats = supervision_loss(logits, q_halt if self.cfg.halting else None, batch.labels, sample_mask)
        return carry, logits, q_halt, loss, stats

    # -- training ----------------------------------------------------------------------------------

    def train_step(
        self,
        batch: TRMBatch,
        step_fn: Callable[[Tensor], object],
        n_sup: int | None = None,
        exploration_prob: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> dict:
        """The paper's deep supervision: one optimizer step per supervision step.

        For each of up to `n_sup` (default cfg.n_sup) steps: forward from the detached carry, then
        `step_fn(loss)`, which must backward the loss, step the optimizer and zero the gradients.

        With cfg.halting, a sample halts after the first step whose q_halt_logit > 0 and is left out
        of the later steps' losses (the reference replaces it with a new sample); the loop ends when
        every sample has halted. As in the reference, with probability `exploration_prob` a sample
        gets a random minimum number of steps in [2, n_sup] before it may halt, so the later steps
        keep being trained. Without halting every step trains on every sample.

        Returns {"steps": steps run, "loss": mean loss, "halt_steps": [B] tensor (the step at
        which each sample halted, n_sup if never), "per_step": [stats dicts as floats]}.
        """
        n_sup = self.cfg.n_sup if n_sup is None else n_sup
        b = batch.labels.shape[0]
        device = batch.labels.device
        carry = self.initial_carry(b)
        active = torch.ones(b, dtype=torch.bool, device=device)
        halt_steps = torch.full((b,), n_sup, dtype=torch.long, device=device)
        min_steps = torch.ones(b, dtype=torch.long, device=device)
        if self.cfg.halting and exploration_prob > 0 and n_sup > 1:
            explore = torch.rand(b, generator=generator) < exploration_prob
            lengths = torch.randint(2, n_sup + 1, (b,), generator=generator)
            min_steps = torch.where(explore, lengths, torch.ones_like(lengths)).to(device)
        per_step = []
        for step in range(1, n_sup + 1):
            carry, _, q_halt, loss, stats = self.step(carry, batch, active if self.cfg.halting else None)
            step_fn(loss)
            stats["active"] = active.float().mean()
            per_step.append({k: float(v) for k, v in stats.items()})
            if self.cfg.halting:
                halted = active & (q_halt.detach() > 0) & (step >= min_steps)
                halt_steps[halted] = step
                active &= ~halted
                if not bool(active.any()):
                    break
        return {
            "steps": len(per_step),
            "loss": sum(s["loss"] for s in per_step) / len(per_step),
            "halt_steps": halt_steps,
            "per_step": per_step,
        }

    # -- inference ---------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        prefix: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        prefix_mask: Tensor | None = None,
        *,
        n_sup: int | None = None,
        halting: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Greedy answers (answer_ids [B, A], cut after the first EOS with pad_id) and halt_steps [B].

        A sample halts at the first supervision step (1-based) where sigmoid(q_halt) > 0.5, and its
        answer is that step's argmax; samples that never halt use step n_sup. Without halting
        (cfg.halting False, or halting=False) every sample runs n_sup steps.
        """
        n_sup = self.cfg.n_sup if n_sup is None else n_sup
        halting = self.cfg.halting if halting is None else halting
        ctx = self.encode_context(prefix, question_ids, question_mask, prefix_mask)
        b, a = question_ids.shape[0], self.cfg.max_answer_len
        carry = self.initial_carry(b)
        answers = torch.full((b, a), self.pad_id, dtype=torch.long, device=question_ids.device)
        halt_steps = torch.zeros(b, dtype=torch.long, device=question_ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=question_ids.device)
        for step in range(1, n_sup + 1):
            carry, logits, q_halt = self(carry, None, question_ids, question_mask, context=ctx)
            stop = (q_halt > 0) if halting else torch.zeros_like(done)
            if step == n_sup:
                stop = torch.ones_like(done)
            new = stop & ~done
            answers[new] = logits.argmax(-1)[new]
            halt_steps[new] = step
            done |= new
            if bool(done.all()):
                break
        return cut_at_eos(answers, self.eos_id, self.pad_id), halt_steps

    def decode(self, answer_ids: Tensor) -> list[str]:
        """Answer strings: the tokens before the first EOS of each row."""
        return decode_answers(self.tokenizer, answer_ids, self.eos_id)

    # -- the decoder contract (decoders/base.py) ---------------------------------------------------

    kind = "trm"
    logged_parts = ("trm/exact", "trm/first_exact")

    def batch_loss(self, prefix: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The deep-supervision loss, with the last and the first step's exact-match fractions."""
        loss, stats = deep_supervision_loss(self, TRMBatch(batch["question_ids"], batch["question_mask"], batch["labels"], prefix))
        return loss, {f"trm/{k}": torch.tensor(v) for k, v in stats.items() if k in ("exact", "first_exact")}

    def answer(
        self, prefix: Tensor, batch: dict, *, max_new_tokens: int, synced_gpus: bool = False,
        sampling: Sampling | None = None, stream: Callable[[str], None] | None = None,
    ) -> tuple[list[str], dict[str, list[float]]]:
        """Answers (at most max_answer_len tokens: the TRM predicts them all at once, so
        `max_new_tokens` does not apply) and the supervision step each example halted at."""
        refuse_sampling(self.kind, sampling, "refines its whole answer at once")
        answer_ids, halts = self.predict(prefix, batch["question_ids"], batch["question_mask"])
        answers = [p.strip() for p in self.decode(answer_ids)]
        return stream_whole(answers, stream), {"trm/halt_step": [float(h) for h in halts.tolist()]}


def deep_supervision_loss(
    model: TRM, batch: TRMBatch, n_sup: int | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Deep supervision for ONE optimizer step: the mean of the n_sup step losses.

    The carry is detached between steps, so each step's loss reaches the parameters only through
    that step's last (grad-enabled) cycle; the prefix is shared by all steps (its gradient is the
    sum over steps). Always runs n_sup steps (no early halting). Returns (loss, stats of the last
    step plus "first_exact", the exact-match fraction at step 1).
    """
    n_sup = model.cfg.n_sup if n_sup is None else n_sup
    prefix = batch.get_prefix()
    carry = model.initial_carry(batch.labels.shape[0])
    total = 0.0
    first_exact = None
    stats: dict[str, Tensor] = {}
    for _ in range(n_sup):
        carry, logits, q_halt = model(carry, prefix, batch.question_ids, batch.question_mask, batch.prefix_mask)
        loss, stats = supervision_loss(logits, q_halt if model.cfg.halting else None, batch.labels)
        total = total + loss
        if first_exact is None:
            first_exact = float(stats["exact"])
    out = {k: float(v) for k, v in stats.items()}
    out["first_exact"] = first_exact
    return total / n_sup, out
