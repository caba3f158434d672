"""A plain causal tiny decoder: the baseline the TRM is compared with.

Same width, depth, heads and blocks as the TRM's tiny network (pre-norm RMSNorm, RoPE multi-head
attention, SwiGLU, final RMSNorm; `edge_glass.decoders.trm.TinyNet`), same embedding scheme and
untied head, conditioned on the same [prefix ; question] context, but run once, causally:

    sequence  [RMSNorm(prefix) ; embed(question) ; BOS ; a_0 ; ... ; a_{A-2}]
    logits at the A answer slots predict          [a_0 ; ... ; EOS ; (ignored)]

so its logits [B, A, V] line up with the TRM's labels from `answer_targets` (answer, EOS, -100)
and the loss is the usual next-token cross-entropy on the answer and its EOS. BOS is a learned
vector, not a token. Padding: question pads and unlabelled answer slots are masked keys and
positions are compacted over valid tokens, so padding changes nothing.

Greedy decoding recomputes the whole sequence for each new token (no KV cache): answers are at
most `max_answer_len` tokens over a context of a few dozen, so the recompute is cheap and keeps
one code path for training and decoding. It stops once every row has emitted EOS.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_glass.config import TRMConfig
from edge_glass.decoders.base import Sampling
from edge_glass.decoders.trm import (
    IGNORE_INDEX,
    PlainPromptIO,
    build_backbone,
    build_context,
    compact_positions,
    cut_at_eos,
    decode_answers,
    refuse_sampling,
    rope_cos_sin,
    stream_whole,
)


class CausalBaseline(PlainPromptIO, nn.Module):
    """Causal tiny decoder with the TRM's width/depth (cfg.hidden_dim, num_layers, num_heads)."""

    def __init__(self, cfg: TRMConfig, tokenizer=None) -> None:
        super().__init__()
        build_backbone(self, cfg, tokenizer)
        h = cfg.hidden_dim
        self.bos = nn.Parameter(nn.init.trunc_normal_(torch.empty(h), std=1.0, a=-2.0, b=2.0))

    def forward(
        self,
        prefix: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        answer_in: Tensor,
        answer_mask: Tensor,
        prefix_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, V] at the answer slots. `answer_in` [B, T] are the answer tokens fed after
        BOS (T-1 of them are used: slot t sees BOS and answer_in[:, :t]); `answer_mask` [B, T]
        marks valid slots (slot 0, the BOS, is always valid)."""
        if prefix is not None:
            prefix = self.prefix_norm(prefix.to(self.bos.dtype))
        x, xmask = build_context(prefix, prefix_mask, self.embed(question_ids), question_mask)
        b, t = answer_in.shape
        a_emb = torch.cat([self.bos.expand(b, 1, -1), self.embed(answer_in[:, : t - 1])], dim=1)
        amask = answer_mask.bool().clone()
        amask[:, 0] = True
        seq = torch.cat([x, a_emb], dim=1)
        keys = torch.cat([xmask, amask], dim=1)
        s = seq.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=seq.device).tril()
        eye = torch.eye(s, dtype=torch.bool, device=seq.device)
        # A query always sees itself, so a padded row never has an empty (NaN) softmax.
        mask = (causal & keys[:, None, :]) | eye
        cos, sin = rope_cos_sin(compact_positions(keys), self.head_dim)
        out = self.net(seq, cos, sin, mask[:, None])
        return self.head(out[:, x.shape[1]:])

    def loss(
        self,
        prefix: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        labels: Tensor,
        prefix_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(next-token CE over the labelled answer + EOS positions, logits [B, A, V]) for labels
        from `answer_targets` (answer, EOS, then -100)."""
        valid = labels != IGNORE_INDEX
        logits = self(prefix, question_ids, question_mask, labels.masked_fill(~valid, self.pad_id), valid, prefix_mask)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return ce, logits

    @torch.no_grad()
    def predict(
        self,
        prefix: Tensor | None,
        question_ids: Tensor,
        question_mask: Tensor,
        prefix_mask: Tensor | None = None,
        max_len: int | None = None,
    ) -> Tensor:
        """Greedy answers [B, A] (A = max_len or cfg.max_answer_len), cut after the first EOS."""
        a = self.cfg.max_answer_len if max_len is None else max_len
        b = question_ids.shape[0]
        ids = torch.full((b, a), self.pad_id, dtype=torch.long, device=question_ids.device)
        mask = torch.zeros((b, a), dtype=torch.bool, device=question_ids.device)
        finished = torch.zeros(b, dtype=torch.bool, device=question_ids.device)
        for t in range(a):
            mask[:, t] = True
            logits = self(prefix, question_ids, question_mask, ids[:, : t + 1], mask[:, : t + 1], prefix_mask)
            nxt = logits[:, t].argmax(-1)
            ids[:, t] = torch.where(finished, torch.full_like(nxt, self.pad_id), nxt)
            finished |= nxt == self.eos_id
            if bool(finished.all()):
                break
        return cut_at_eos(ids, self.eos_id, self.pad_id)

    def decode(self, answer_ids: Tensor) -> list[str]:
        """Answer strings: the tokens before the first EOS of each row."""
        return decode_answers(self.tokenizer, answer_ids, self.eos_id)

    # -- the decoder contract (decoders/base.py) ---------------------------------------------------

    kind = "causal"
    logged_parts: tuple[str, ...] = ()

    def batch_loss(self, prefix: Tensor, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, _ = self.loss(prefix, batch["question_ids"], batch["question_mask"], batch["labels"])
        return loss, {}

    def answer(
        self, prefix: Tensor, batch: dict, *, max_new_tokens: int, synced_gpus: bool = False,
        sampling: Sampling | None = None, stream: Callable[[str], None] | None = None,
    ) -> tuple[list[str], dict[str, list[float]]]:
        """Greedy answers of at most max_answer_len tokens (the length it is trained for)."""
        refuse_sampling(self.kind, sampling, "is the TRM's greedy ablation baseline")
        answer_ids = self.predict(prefix, batch["question_ids"], batch["question_mask"])
        return stream_whole([p.strip() for p in self.decode(answer_ids)], stream), {}
