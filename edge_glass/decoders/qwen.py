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
from edge_glass.decoders.packing import collate_packed, flatten_rows
from edge_glass.decoders.qwen_chat import collate_examples, end_of_turn_id, placeholder_id, tokenize_example, tokenize_prompt
from edge_glass.utils.errors import UserError


def _layout(batch: dict) -> dict:
    """The model inputs that differ between a padded batch (an attention mask) and a packed one
    (position ids that restart at each example, the row of each example's prefix slots)."""
    if "position_ids" in batch:
        return {"attention_mask": None, "position_ids": batch["position_ids"], "prefix_rows": batch["prefix_rows"]}
    return {"attention_mask": batch["attention_mask"], "position_ids": None, "prefix_rows": None}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require_cuda_package(module: str, package: str, setting: str, instead: str) -> None:
    """A UserError naming what `setting` lacks (the package, a CUDA GPU, or both) and what to set instead."""
    missing = []
    if importlib.util.find_spec(module) is None:
        missing.append(f"the {package} package (pip install {package})")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise UserError(f"decoder.qwen.{setting} needs {' and '.join(missing)}; {instead}")


def _attention(cfg: QwenConfig) -> str:
    """transformers' `attn_implementation` for `cfg.attention`, or a UserError naming what is missing."""
    if cfg.attention == "flash_attention_2":
        _require_cuda_package("flash_attn", "flash-attn", "attention: flash_attention_2",
                              "use sdpa (torch's fused attention) instead")
    return cfg.attention


def _quantization_config(cfg: QwenConfig):
    """`BitsAndBytesConfig` for `cfg.quantize`, or a UserError naming what is missing."""
    _require_cuda_package("bitsandbytes", "bitsandbytes", f"quantize: {cfg.quantize!r}",
                          "set quantize: none to load the model unquantised")
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
        load_kwargs: dict = {"revision": cfg.revision, "attn_implementation": _attention(cfg)}
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
        if cfg.gradient_checkpointing:
            # Non-reentrant: the inputs (prefix embeddings) need not require grad, and LoRA's
            # frozen base is fine with it; transformers applies it in training mode only.
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.model = self._apply_tune(model, cfg)

    def prepare_training(self) -> None:
        """Training-only setup, called by the instruct stage: `compile` compiles each decoder
        layer here, after LoRA is in place (its adapters live inside the layers); the layers share
        one compiled graph, and the head and loss stay eager. Not at construction: a model loaded
        for answering generates with a growing cache, whose changing shapes would recompile."""
        if self.cfg.compile:
            for layer in self._causal_lm().model.layers:
                layer.compile()

    @staticmethod
    def _apply_tune(model: nn.Module, cfg: QwenConfig) -> nn.Module:
        if cfg.tune == "lora":
            import peft

            if cfg.quantize != "none":
                model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            targets = list(cfg.lora.target_modules)
            lora = peft.LoraConfig(
                task_type=peft.TaskType.CAUSAL_LM,
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                # peft's own spelling: every Linear but the output head.
                target_modules="all-linear" if targets == ["all-linear"] else targets,
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

    def _causal_lm(self) -> nn.Module:
        """The transformers causal LM under peft's wrapper (or the model itself)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

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
        prefix_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [R, L, H] with the slots at (`prefix_rows`, `prefix_positions`) [E, N]
        replaced by `prefix_embeds` [E, N, H]. Without `prefix_rows`, example e is row e (a padded
        batch); a packed batch (decoders/packing.py) holds several examples per row."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if prefix_embeds is None:
            return embeds
        if prefix_positions is None:
            raise ValueError("prefix_embeds given without prefix_positions")
        e, n = prefix_positions.shape
        if prefix_embeds.shape != (e, n, embeds.shape[-1]):
            raise ValueError(
                f"prefix_embeds has shape {list(prefix_embeds.shape)}, but prefix_positions asks for "
                f"[{e}, {n}, {embeds.shape[-1]}]"
            )
        if prefix_rows is None:
            rows = torch.arange(e, device=embeds.device).unsqueeze(1).expand(e, n)
        else:
            rows = prefix_rows.to(embeds.device)
        # Out-of-place, so gradients flow into the connector and (when trained) the embedding.
        return embeds.index_put(
            (rows, prefix_positions.to(embeds.device)), prefix_embeds.to(device=embeds.device, dtype=embeds.dtype)
        )

    def forward(
        self,
        prefix_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        prefix_positions: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        prefix_rows: torch.Tensor | None = None,
    ):
        """LM output (`.loss` over the supervised labels when `labels` is given, `.logits` [B, L, V]).

        Labels are the collated ones (-100 on prompt, prefix slots and padding); the model shifts
        them itself, so position t's label is the token it should follow position t-1 with. A
        packed batch passes `position_ids` and `prefix_rows` and no `attention_mask`.
        """
        inputs_embeds = self.embed(input_ids, prefix_embeds, prefix_positions, prefix_rows)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          labels=labels, use_cache=False)

    # -- the decoder contract (decoders/base.py) ---------------------------------------------------

    @property
    def width(self) -> int:
        return self.hidden_size

    def encode_examples(self, examples, num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        """Chat-template sequences with prefix slots, answer + end-of-turn supervised: right-padded
        rows, one example each, or with `packing` several examples per row of `max_length`."""
        tokenised = self._tokenise(examples, num_prefix_tokens)
        if self.cfg.packing:
            return collate_packed(tokenised, self.pad_id, self.cfg.max_length)
        return self._padded(tokenised)

    def encode_eval_examples(self, examples, num_prefix_tokens: int) -> dict[str, torch.Tensor]:
        """One right-padded row per example, packing or not: evaluation cuts its batches by
        example (eval.max_samples), and the loss is the same in either layout."""
        return self._padded(self._tokenise(examples, num_prefix_tokens))

    def _tokenise(self, examples, num_prefix_tokens: int) -> list[dict]:
        return [
            tokenize_example(
                self.tokenizer, e["prompt"], e["answer"], num_prefix_tokens, self.cfg.max_length,
                system_prompt=self.system_prompt, chat_template_kwargs=self.template_kwargs,
            )
            for e in examples
        ]

    def _padded(self, tokenised: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate_examples(tokenised, self.pad_id, padding_side="right")
        batch["num_tokens"] = batch["attention_mask"].sum()
        return batch

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
        if "position_ids" in batch and self.cfg.attention == "flash_attention_2":
            batch = flatten_rows(batch)  # its kernels see example boundaries in one row only
        layout = _layout(batch)
        chunk_rows = getattr(self.cfg, "loss_chunk_rows", None)
        if chunk_rows is None:  # the plain path: every position's logits, Hugging Face's loss
            out = self(prefix, batch["input_ids"], layout["attention_mask"], batch["labels"], batch["prefix_positions"],
                       position_ids=layout["position_ids"], prefix_rows=layout["prefix_rows"])
            return out.loss, {}
        return self.answer_loss(prefix, batch["input_ids"], layout["attention_mask"], batch["labels"],
                                batch["prefix_positions"], chunk_rows, position_ids=layout["position_ids"],
                                prefix_rows=layout["prefix_rows"]), {}

    def answer_loss(self, prefix_embeds: torch.Tensor | None, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None, labels: torch.Tensor, prefix_positions: torch.Tensor | None,
                    chunk_rows: int, *, position_ids: torch.Tensor | None = None,
                    prefix_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The same mean cross-entropy as `forward(...).loss`, from the transformer's hidden states
        of the supervised positions only, through the head in chunks (decoders/chunked_ce.py): the
        prompt's and the padding's logits are never computed, and no [B, L, V] tensor exists."""
        from edge_glass.decoders.chunked_ce import linear_cross_entropy, supervised_rows

        causal_lm = self._causal_lm()
        head = causal_lm.get_output_embeddings()
        inputs_embeds = self.embed(input_ids, prefix_embeds, prefix_positions, prefix_rows)
        hidden = causal_lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
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
