"""A tiny GRU decoder as a plug-in (tests/test_decoder_plugin.py): the `Decoder` protocol of
edge_glass/decoders/base.py, registered as `decoder.kind: gru` by importing this module.

    row       [prefix ; question ; answer ; EOS] (right-padded; a GRU is causal, so pads change nothing)
    loss      next-token CE on the answer tokens and EOS (teacher forcing)
    answer    prefix + question packed to each row's length, then greedy steps until EOS
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from edge_glass.config import ConfigError
from edge_glass.decoders.base import IGNORE_INDEX
from edge_glass.decoders.registry import DECODERS, register_decoder


@dataclass
class GRUOptions:
    tokenizer: str
    """Hub id or local directory of the tokenizer (AutoTokenizer)."""
    hidden_dim: int = 64
    """Embedding and GRU width; also the width of the prefix it reads."""
    max_answer_len: int = 8
    """Answer tokens trained on and generated, EOS included."""

    def __post_init__(self) -> None:  # `{path}` becomes `decoder.options`, as in the built-in sections
        for name in ("hidden_dim", "max_answer_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{{path}}.{name}: must be > 0, got {getattr(self, name)}")


class GRUDecoder(nn.Module):
    kind = "gru"
    logged_parts = ("gru/token_acc",)

    def __init__(self, options: GRUOptions) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.options, self.width = options, options.hidden_dim
        self.tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.embed = nn.Embedding(len(self.tokenizer), options.hidden_dim)
        self.gru = nn.GRU(options.hidden_dim, options.hidden_dim, batch_first=True)
        self.head = nn.Linear(options.hidden_dim, len(self.tokenizer))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def encode_examples(self, examples, num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        questions = [self._ids(e["prompt"]) or [self.pad_id] for e in examples]
        answers = [self._ids(e["answer"])[: self.options.max_answer_len - 1] + [self.eos_id] for e in examples]
        ids = self._pad([q + a for q, a in zip(questions, answers)])
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (q, a) in enumerate(zip(questions, answers)):
            labels[i, len(q): len(q) + len(a)] = torch.tensor(a)
        return {"gru_ids": ids, "gru_labels": labels}

    def generation_inputs(self, examples, num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        questions = [self._ids(e["prompt"]) or [self.pad_id] for e in examples]
        return {"gru_question": self._pad(questions), "gru_question_len": torch.tensor([len(q) for q in questions])}

    def _logits(self, prefix: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits [N, L, V]; position j predicts token j of `gru_ids` (from prefix and tokens < j)."""
        p = prefix.shape[1]
        out, _ = self.gru(torch.cat([prefix.to(self.embed.weight.dtype), self.embed(batch["gru_ids"])], dim=1))
        return self.head(out[:, p - 1: -1])

    def batch_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, labels = self._logits(prefix, batch), batch["gru_labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        valid = labels != IGNORE_INDEX
        acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        return loss, {"gru/token_acc": acc.detach()}

    @torch.no_grad()
    def eval_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[float, int]:
        labels = batch["gru_labels"]
        total = F.cross_entropy(self._logits(prefix, batch).flatten(0, 1).float(), labels.flatten(),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return float(total), int((labels != IGNORE_INDEX).sum())

    @torch.no_grad()
    def answer(self, prefix: torch.Tensor, batch: dict, *, max_new_tokens: int, synced_gpus: bool = False):
        x = torch.cat([prefix.to(self.embed.weight.dtype), self.embed(batch["gru_question"])], dim=1)
        lengths = (batch["gru_question_len"] + prefix.shape[1]).cpu()
        _, h = self.gru(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        tokens, done = [], torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(min(self.options.max_answer_len, max_new_tokens)):
            nxt = self.head(h[-1]).argmax(-1).masked_fill(done, self.eos_id)
            tokens.append(nxt)
            done |= nxt == self.eos_id
            if bool(done.all()) and not synced_gpus:  # ZeRO-3 across ranks: every rank runs every step
                break
            _, h = self.gru(self.embed(nxt)[:, None], h)
        rows = torch.stack(tokens, dim=1).tolist()
        cut = [r[: r.index(self.eos_id)] if self.eos_id in r else r for r in rows]
        return [self.tokenizer.decode(r).strip() for r in cut], {}


if "gru" not in DECODERS:
    register_decoder("gru", lambda cfg, options: GRUDecoder(options), options=GRUOptions)
