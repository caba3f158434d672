"""QwenDecoder: a Qwen2 / 2.5 / 3 causal LM that reads soft prefix tokens inside its chat turn.

Loading goes through `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`,
so a hub id and a local directory (the tests' tiny random Qwen2) take the same path. What
trains is `QwenConfig.tune`:

    frozen   nothing in the LM (only the connector in front of it)
    full     every LM parameter
    lora     peft LoRA adapters on `lora.target_modules`; the base stays frozen

`quantize` (8bit / 4bit) loads the frozen base through bitsandbytes; it needs the package and
a CUDA device, and is refused with a one-line `UserError` otherwise.

The prefix is not prepended: the tokenised sequence already holds `num_prefix_tokens` slot
ids inside the user turn (see `edge_glass.decoders.qwen_chat`), and `embed` overwrites the token
embeddings at `prefix_positions` with the connector's output. Training and generation therefore
share the exact same sequence layout and position ids.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import torch
from torch import nn

from edge_glass.config import QwenConfig
from edge_glass.decoders.base import IGNORE_INDEX, Sampling, seeded
from edge_glass.decoders.qwen_chat import collate_examples, end_of_turn_id, placeholder_id, tokenize_example, tokenize_prompt
from edge_glass.utils.errors import UserError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _quantization_config(cfg: QwenConfig):
    """`BitsAndBytesConfig` for `cfg.quantize`, or a UserError naming what is missing."""
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise UserError(
            f"decoder.qwen.quantize: {cfg.quantize!r} needs {' and '.join(missing)}; "
            "set quantize: none to load the model unquantised"
        )
    if cfg.tune == "full":
        raise UserError("decoder.qwen.quantize: a quantised model cannot be fully fine-tuned; use tune: lora or frozen")
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


class QwenDecoder(nn.Module):
    """Causal LM + tokenizer; `forward` takes prefix embeddings and tokenised instruction batches."""

    kind = "qwen"
    logged_parts: tuple[str, ...] = ()

    def __init__(self, cfg: QwenConfig, *, dtype: torch.dtype | str = "auto", system_prompt: str | None = None) -> None:
        """`dtype` is the load dtype ("auto": the checkpoint's own, e.g. bf16 for hub Qwen, fp32
        for the tiny test model); mixed precision during training is DeepSpeed's business.
        `system_prompt` is rendered before every user turn (`decoder.system_prompt`)."""
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.system_prompt = system_prompt
        # Qwen3's template renders an empty think block when told the model answers directly.
        self.template_kwargs = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
        load_kwargs: dict = {"revision": cfg.revision}
        if cfg.quantize != "none":
            load_kwargs["quantization_config"] = _quantization_config(cfg)
            # bitsandbytes weights are placed at load time, on this process's GPU.
            load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
            load_kwargs["dtype"] = torch.bfloat16
        else:
            load_kwargs["dtype"] = dtype
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, **load_kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"decoder.qwen.model: cannot load {cfg.model!r}: {_first_line(e)}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.end_of_turn_id = end_of_turn_id(self.tokenizer)
        self.pad_id = placeholder_id(self.tokenizer)
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.model = self._apply_tune(model, cfg)

    @staticmethod
    def _apply_tune(model: nn.Module, cfg: QwenConfig) -> nn.Module:
        if cfg.tune == "lora":
            import peft

            if cfg.quantize != "none":
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            lora = peft.LoraConfig(
                task_type=peft.TaskType.CAUSAL_LM,
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules),
                bias="none",
            )
            try:
                with warnings.catch_warnings():
                    # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                    return peft.get_peft_model(model, lora)
            except ValueError as e:
                raise UserError(f"decoder.qwen.lora.target_modules: {_first_line(e)}") from None
        for p in model.parameters():
            p.requires_grad_(cfg.tune == "full")
        return model

    # ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def embed(
        self,
        input_ids: torch.Tensor,
        prefix_embeds: torch.Tensor | None = None,
        prefix_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, L, H] with the slots at `prefix_positions` [B, N] replaced by `prefix_embeds` [B, N, H]."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if prefix_embeds is None:
            return embeds
        if prefix_positions is None:
            raise ValueError("prefix_embeds given without prefix_positions")
        b, n = prefix_positions.shape
        if prefix_embeds.shape != (b, n, embeds.shape[-1]):
            raise ValueError(
                f"prefix_embeds has shape {list(prefix_embeds.shape)}, but prefix_positions asks for "
                f"[{b}, {n}, {embeds.shape[-1]}]"
            )
        rows = torch.arange(b, device=embeds.device).unsqueeze(1).expand(b, n)
        # Out-of-place, so gradients flow into the connector and (when trained) the embedding.
        return embeds.index_put(
            (rows, prefix_positions.to(embeds.device)), prefix_embeds.to(device=embeds.device, dtype=embeds.dtype)
        )

    def forward(
        self,
        prefix_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        prefix_positions: torch.Tensor | None = None,
    ):
        """LM output (`.loss` over the supervised labels when `labels` is given, `.logits` [B, L, V]).

        Labels are the collated ones (-100 on prompt, prefix slots and padding); the model shifts
        them itself, so position t's label is the token it should follow position t-1 with.
        """
        inputs_embeds = self.embed(input_ids, prefix_embeds, prefix_positions)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    # -- the decoder contract (decoders/base.py) ---------------------------------------------------

    @property
    def width(self) -> int:
        return self.hidden_size

    def encode_examples(self, examples, num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        """Chat-template sequences with prefix slots, answer + end-of-turn supervised, right-padded."""
        tokenised = [
            tokenize_example(
                self.tokenizer, e["prompt"], e["answer"], num_prefix_tokens, self.cfg.max_length,
                system_prompt=self.system_prompt, chat_template_kwargs=self.template_kwargs,
            )
            for e in examples
        ]
        return collate_examples(tokenised, self.pad_id, padding_side="right")

    def generation_inputs(self, examples, num_prefix_tokens: int) -> dict:
        """`prompts`: each example's prompt part alone, ending where the assistant's answer starts."""
        return {"prompts": [
            tokenize_prompt(
                self.tokenizer, e["prompt"], num_prefix_tokens, self.cfg.max_length,
                system_prompt=self.system_prompt, chat_template_kwargs=self.template_kwargs,
            )
            for e in examples
        ]}

    def batch_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        chunk_rows = getattr(self.cfg, "loss_chunk_rows", None)
        if chunk_rows is None:  # the plain path: every position's logits, Hugging Face's loss
            out = self(prefix, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prefix_positions"])
            return out.loss, {}
        return self.answer_loss(prefix, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                batch["prefix_positions"], chunk_rows), {}

    def answer_loss(self, prefix_embeds: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor, prefix_positions: torch.Tensor | None, chunk_rows: int) -> torch.Tensor:
        """The same mean cross-entropy as `forward(...).loss`, from the transformer's hidden states
        of the supervised positions only, through the head in chunks (decoders/chunked_ce.py): the
        prompt's and the padding's logits are never computed, and no [B, L, V] tensor exists."""
        from edge_glass.decoders.chunked_ce import linear_cross_entropy, supervised_rows

        causal_lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        head = causal_lm.get_output_embeddings()
        inputs_embeds = self.embed(input_ids, prefix_embeds, prefix_positions)
        hidden = causal_lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        rows, targets = supervised_rows(hidden, labels.to(hidden.device))
        if getattr(head, "bias", None) is not None:  # not Qwen's; a head with a bias takes the plain path
            return torch.nn.functional.cross_entropy(head(rows).float(), targets)
        return linear_cross_entropy(rows, head.weight, targets, chunk_rows)

    def eval_loss(self, prefix: torch.Tensor, batch: dict) -> tuple[float, int]:
        """Summed cross-entropy over the supervised tokens and their number, so batches and ranks
        of different lengths average per token, not per batch."""
        loss, _ = self.batch_loss(prefix, batch)
        # The model's loss is the mean over the shifted labels; their count undoes the mean.
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return float(loss) * tokens, tokens

    def answer(self, prefix: torch.Tensor, batch: dict, *, max_new_tokens: int, synced_gpus: bool = False,
               sampling: Sampling | None = None, stream: Callable[[str], None] | None = None):
        """Answers up to the end-of-turn token, greedy unless `sampling`; `synced_gpus` under
        ZeRO-3 (sharded weights); `stream` receives one example's text as it is generated."""
        from edge_glass.decoders.generation import generate

        extra = {} if sampling is None else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if stream is not None:
            extra["stream"] = stream
        with seeded(sampling, prefix.device):
            answers = generate(self, prefix, batch["prompts"], max_new_tokens=max_new_tokens, synced_gpus=synced_gpus, **extra)
        return answers, {}
