"""Which decoders exist: `decoder.kind` -> how to build it and where its settings live.

    register_decoder("gru", build_gru, options=GRUOptions)   # a plug-in: one line
    decoder = build_decoder(cfg.decoder)                     # the instruct stage

The built-in decoders read their own config sections (`decoder.qwen`, `decoder.trm`); a plug-in
decoder reads `decoder.options`, checked against the dataclass it registers (unknown keys and
wrong types are refused with their dotted path, like every other section). Builders of the
built-ins import their module on first use, so an align run never imports transformers' LM
classes or peft. This module imports neither torch nor the config at load time: the config's
validation asks it which kinds exist.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from edge_glass.utils.errors import UserError

if TYPE_CHECKING:
    from edge_glass.config import DecoderConfig
    from edge_glass.decoders.base import Decoder


@dataclass(frozen=True)
class DecoderEntry:
    build: Callable[["DecoderConfig", Any], "Decoder"]
    """Makes the decoder from the decoder section and its parsed options (None without)."""
    section: str | None = None
    """The `decoder.<section>` field holding its settings; None: it reads `decoder.options`."""
    options: type | None = None
    """Dataclass that `decoder.options` is checked against (plug-ins; None: takes no options)."""
    chat_template: bool = False
    """It renders a chat template, so `decoder.system_prompt` means something to it."""


def _build_qwen(cfg: "DecoderConfig", options: Any) -> "Decoder":
    from edge_glass.decoders.qwen import QwenDecoder

    return QwenDecoder(cfg.qwen, system_prompt=cfg.system_prompt)


def _build_trm(cfg: "DecoderConfig", options: Any) -> "Decoder":
    # `recursive: false` is the same network run once, causally: the baseline the TRM is
    # compared with, so it shares the TRM's section rather than having one of its own.
    if cfg.trm.recursive:
        from edge_glass.decoders.trm import TRM

        return TRM(cfg.trm)
    from edge_glass.decoders.causal_baseline import CausalBaseline

    return CausalBaseline(cfg.trm)


DECODERS: dict[str, DecoderEntry] = {
    "qwen": DecoderEntry(_build_qwen, section="qwen", chat_template=True),
    "trm": DecoderEntry(_build_trm, section="trm"),
}


def register_decoder(
    kind: str, build: Callable[["DecoderConfig", Any], "Decoder"], *, options: type | None = None,
    chat_template: bool = False,
) -> None:
    """Make `decoder.kind: <kind>` build `build(cfg.decoder, options)`; its settings come from
    `decoder.options`, checked against the `options` dataclass."""
    if kind == "none" or kind in DECODERS:
        raise ValueError(f"decoder kind {kind!r} is already taken")
    DECODERS[kind] = DecoderEntry(build, options=options, chat_template=chat_template)


def decoder_entry(kind: str) -> DecoderEntry:
    """The registered entry of `kind`; a UserError names the registered kinds."""
    if kind not in DECODERS:
        match = difflib.get_close_matches(kind, list(DECODERS), n=1, cutoff=0.5)
        hint = f"did you mean {match[0]!r}? " if match else ""
        raise UserError(f"unknown decoder {kind!r}; {hint}registered: {', '.join(DECODERS)}")
    return DECODERS[kind]


def build_decoder(cfg: "DecoderConfig") -> "Decoder":
    """The decoder `cfg.kind` names, built from its settings."""
    from edge_glass.config import parse_section

    entry = decoder_entry(cfg.kind)
    options = parse_section(entry.options, cfg.options or {}, "decoder.options") if entry.options else None
    return entry.build(cfg, options)
