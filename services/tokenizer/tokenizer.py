"""The model's Hugging Face fast tokenizer behind the operations the service offers."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import decoders

from services.common.model_store import resolve_model_path
from services.tokenizer.chat import (
    ChatPrompt,
    ChatRequest,
    check_template_kwargs,
    role_not_rendered,
    role_probe,
)
from services.tokenizer.chat_templates import (
    ToolFallback,
    read_chat_template,
    reserved_template_vars,
)
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.stream import DetokenizeOptions, DetokenizeStream

# What a chat template raises on a conversation it cannot render.
TEMPLATE_ERRORS = (jinja2.TemplateError, ValueError, TypeError, KeyError)


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # (id, text) of every special token, by id.
    special_tokens: tuple[tuple[int, str], ...]
    context_length: int | None
    has_chat_template: bool
    model_path: str


class Tokenizer:
    """Encode, chat templates, decode and detokenize streams for one model.

    Every method may be called from several threads at once: nothing changes the Hugging Face
    tokenizer after loading. `chat_template` (from --chat-template) replaces the model's own; a
    template that ignores `tools` gives way to the built-in tool_chat for requests that have them.
    """

    def __init__(self, hf: Any, model_dir: Path, chat_template: str | None = None) -> None:
        if not hf.is_fast:
            raise ValueError(f"{model_dir} has no fast tokenizer (tokenizer.json)")
        self.hf = hf
        self.backend = hf.backend_tokenizer
        self.chat_template = chat_template
        added = hf.added_tokens_decoder
        self._added_tokens = {i: tok.content for i, tok in added.items()}
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.info = read_info(hf, model_dir, bool(chat_template or hf.chat_template))
        self._byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)
        self.tool_fallback = ToolFallback()
        self._reserved_vars = reserved_template_vars(hf)

    @classmethod
    def load(cls, model_path: str = "default", chat_template: str | None = None) -> Tokenizer:
        """Resolves `model_path` (see model_store) and loads its tokenizer; slow, call off-loop.

        `chat_template` is a built-in template's name or a template file.
        """
        from transformers import AutoTokenizer

        model_dir = resolve_model_path(model_path)
        template = read_chat_template(chat_template) if chat_template else None
        return cls(AutoTokenizer.from_pretrained(model_dir), model_dir, template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, request: ChatRequest) -> ChatPrompt:
        """Renders the conversation and tokenizes it (the template writes the special tokens)."""
        text = self._render(request)
        return ChatPrompt(text, self.encode(text, add_special_tokens=False))

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = False,
    ) -> str:
        """Text of `ids`; ids the tokenizer does not know decode to nothing."""
        if spaces_between_special_tokens:
            return self._decode_spaced(ids, skip_special_tokens)
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_pieces(self, ids: Sequence[int]) -> list[tuple[str, bytes]]:
        """(text, exact bytes) of each id on its own, special tokens included."""
        if any(not 0 <= i < self.info.vocab_size for i in ids):
            raise InvalidRequest(f"token ids must be in [0, {self.info.vocab_size})")
        return [self._piece(i) for i in ids]

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        text = self.backend.decode([token_id], skip_special_tokens=False)
        raw = self.backend.id_to_token(token_id)
        if raw is None or token_id in self._added_tokens:
            return text, text.encode()
        if self._byte_level:
            return text, bytes(BYTE_LEVEL_DECODER[c] for c in raw)
        fallback = BYTE_FALLBACK.fullmatch(raw)
        if fallback is not None:
            return text, bytes([int(fallback.group(1), 16)])
        return text, text.encode()

    def new_detokenizer(self, options: DetokenizeOptions) -> DetokenizeStream:
        """A stream that turns one request's output ids into text deltas."""
        decode = functools.partial(
            self.decode,
            skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
        )
        return DetokenizeStream(decode, options)

    def _render(self, request: ChatRequest) -> str:
        check_template_kwargs(request.chat_template_kwargs, self._reserved_vars)
        if not (request.chat_template or self.chat_template or self.hf.chat_template):
            raise InvalidRequest(
                "the model has no chat template; start the service with --chat-template"
            )
        try:
            template = self._template_for(request)
        except TEMPLATE_ERRORS as exc:
            raise InvalidRequest(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        self._check_roles(template, request)
        try:
            return self._render_with(template, request, request.tools)
        except TEMPLATE_ERRORS as exc:
            raise InvalidRequest(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def _check_roles(self, template: str, request: ChatRequest) -> None:
        """Refuses a role beyond OpenAI's that the template drops (or fails on), naming it."""
        probe = role_probe(request)
        if probe is None:
            return
        probed, markers = probe
        try:
            text = self._render_with(template, probed, request.tools)
        except TEMPLATE_ERRORS as exc:
            raise role_not_rendered(request, min(markers), f"{type(exc).__name__}: {exc}") from exc
        for index, marker in markers.items():
            if marker not in text:
                raise role_not_rendered(request, index)

    def _template_for(self, request: ChatRequest) -> str:
        """The template text for `request`: tool_chat stands in for a service template that
        ignores the request's tools (a per-request template is always used as sent)."""
        tools = list(request.tools) or None
        template = self.hf.get_chat_template(request.chat_template or self.chat_template, tools)
        if not request.tools or request.chat_template is not None:
            return template

        def renders_same() -> bool:
            with_tools = self._render_with(template, request, request.tools)
            return with_tools == self._render_with(template, request, ())

        if self.tool_fallback.ignores_tools(template, renders_same):
            return self.tool_fallback.template
        return template

    def _render_with(
        self, template: str, request: ChatRequest, tools: Sequence[dict[str, Any]]
    ) -> str:
        return self.hf.apply_chat_template(
            [m.to_template() for m in request.messages],
            tools=list(tools) or None,
            chat_template=template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tokenize=False,
            **request.chat_template_kwargs,
        )

    def _decode_spaced(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """Decodes runs of ordinary ids; added tokens stand alone; all joined by one space."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i not in self._added_tokens:
                run.append(i)
            elif not (skip_special_tokens and i in self._special_ids):
                if run:
                    parts.append(self.backend.decode(run))
                    run = []
                parts.append(self._added_tokens[i])
        if run:
            parts.append(self.backend.decode(run))
        return " ".join(parts)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character → the byte it encodes (byte-level BPE vocabularies)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


BYTE_LEVEL_DECODER = _byte_level_decoder()
# SentencePiece byte-fallback tokens such as <0xE2>.
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def read_info(hf: Any, model_dir: Path, has_chat_template: bool) -> TokenizerInfo:
    """What the gateway needs to know about the tokenizer, from it and the model's json files."""
    config = _read_json(model_dir / "config.json")
    generation = _read_json(model_dir / "generation_config.json")
    eos = [
        *_ids(generation.get("eos_token_id")),
        *_ids(config.get("eos_token_id")),
        *_ids(hf.eos_token_id),
    ]
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    special = sorted((i, tok.content) for i, tok in hf.added_tokens_decoder.items() if tok.special)
    return TokenizerInfo(
        vocab_size=len(hf),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        bos_token_id=hf.bos_token_id,
        special_tokens=tuple(special),
        context_length=int(context) if context else None,
        has_chat_template=has_chat_template,
        model_path=str(model_dir),
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
