"""OpenAI (and native /generate) response bodies and stream chunks, built from gateway outputs.

A format turns one request's outputs into JSON-ready dicts: `opening()` chunks before any output,
`chunk(out)` per output, `closing(usage)` after the last, or `response(choices, usage)` at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.gateway.chat_tools import Answer, ToolPlan, merge_call_entries
from services.gateway.events import Output, TokenLogprob, TokenPiece, Usage

# JSON has no infinity: the floor vLLM also uses for logprobs of impossible tokens.
MIN_LOGPROB = -9999.0


@dataclass
class Choice:
    """One choice's outputs joined."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, out: Output) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.finish_reason = out.finish_reason or self.finish_reason


def join_outputs(outputs: list[Output], num_choices: int) -> list[Choice]:
    choices = [Choice(i) for i in range(num_choices)]
    for out in outputs:
        choices[out.index].add(out)
    return choices


@dataclass(frozen=True)
class Meta:
    """What every body of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """The fields every OpenAI body has around its choices."""
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**body, "choices": choices, **extra}


class Format(Protocol):
    def opening(self) -> list[dict[str, Any]]: ...
    def chunk(self, out: Output) -> dict[str, Any] | None: ...
    def closing(self, usage: Usage) -> list[dict[str, Any]]: ...
    def response(self, choices: list[Choice], usage: Usage) -> Any: ...


def usage_dict(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def _piece(piece: TokenPiece, logprob: float) -> dict[str, Any]:
    return {"token": piece.text, "logprob": _logprob(logprob), "bytes": list(piece.raw)}


def chat_logprobs(lps: list[TokenLogprob]) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of a chat completion."""
    return [
        {**_piece(lp.token, lp.logprob), "top_logprobs": [_piece(p, v) for p, v in lp.top]}
        for lp in lps
    ]


def completion_logprobs(lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """`choices[i].logprobs` of a completion; `offset` is where the first token's text starts."""
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(lp.token.text)
    return {
        "tokens": [lp.token.text for lp in lps],
        "token_logprobs": [_logprob(lp.logprob) for lp in lps],
        "top_logprobs": [_top_dict(lp) for lp in lps],
        "text_offset": offsets,
    }


def _top_dict(lp: TokenLogprob) -> dict[str, float]:
    """The alternatives plus the chosen token (OpenAI returns up to logprobs + 1 entries)."""
    top = {p.text: _logprob(v) for p, v in lp.top}
    top.setdefault(lp.token.text, _logprob(lp.logprob))
    return top


# OpenAI's finish_reason enum has no "abort": a sample the server ended early (an Abort from
# elsewhere) is reported as cut short. /generate keeps SGLang's "abort".
OPENAI_FINISH_REASONS = {"abort": "length"}


def _choice(index: int, finish_reason: str | None, **fields: Any) -> dict[str, Any]:
    """An OpenAI choice; `finish_reason` mapped onto OpenAI's enum."""
    reason = OPENAI_FINISH_REASONS.get(finish_reason or "", finish_reason)
    return {"index": index, **fields, "finish_reason": reason}


@dataclass
class ChatFormat:
    """Chat completions. With tools or a reasoning parser (`answers`), each choice's text is split
    into reasoning, content and tool calls (services/gateway/chat_tools.py)."""

    meta: Meta
    n: int
    logprobs: bool
    include_usage: bool = False
    _plan: ToolPlan | None = None
    _reasoning: str | None = None
    _answers: dict[int, Answer] = field(default_factory=dict)
    _split: bool = False

    def answers(self, plan: ToolPlan | None, reasoning_parser: str | None) -> None:
        """Split answers by `plan` and the reasoning parser (no-op when neither is set)."""
        self._plan, self._reasoning = plan, reasoning_parser
        self._split = plan is not None or reasoning_parser is not None

    def _answer(self, index: int) -> Answer:
        if index not in self._answers:
            self._answers[index] = Answer(self._plan, self._reasoning)
        return self._answers[index]

    def _finish_reason(self, reason: str | None, answer: Answer | None) -> str | None:
        if answer is not None and answer.called and reason == "stop":
            return "tool_calls"
        return reason

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        usage = {"usage": None} if self.include_usage else {}
        return self.meta.envelope("chat.completion.chunk", choices, **usage)

    def opening(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk([_choice(i, None, delta=role, logprobs=None)]) for i in range(self.n)]

    def chunk(self, out: Output) -> dict[str, Any] | None:
        if not (out.text or out.logprobs or out.finish_reason):
            return None
        answer = None
        if self._split:
            answer = self._answer(out.index)
            delta = answer.feed(out.text)
            if out.finish_reason:
                delta = _merge_delta(delta, answer.finish())
        else:
            delta = {"content": out.text} if out.text else {}
        wanted = self.logprobs and out.logprobs
        if not (delta or wanted or out.finish_reason):
            return None
        logprobs = {"content": chat_logprobs(out.logprobs)} if wanted else None
        reason = self._finish_reason(out.finish_reason, answer)
        return self._chunk([_choice(out.index, reason, delta=delta, logprobs=logprobs)])

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.meta.envelope("chat.completion.chunk", [], usage=usage_dict(usage))]

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        bodies = [self._choice(c) for c in choices]
        return self.meta.envelope("chat.completion", bodies, usage=usage_dict(usage))

    def _choice(self, c: Choice) -> dict[str, Any]:
        logprobs = {"content": chat_logprobs(c.logprobs)} if self.logprobs else None
        if not self._split:
            message = {"role": "assistant", "content": c.text}
            return _choice(c.index, c.finish_reason, message=message, logprobs=logprobs)
        answer = self._answer(c.index)
        message = {"role": "assistant", **answer.message(c.text)}
        reason = self._finish_reason(c.finish_reason, answer)
        return _choice(c.index, reason, message=message, logprobs=logprobs)


def _merge_delta(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two deltas of one choice as one: text fields joined, tool-call entries listed."""
    merged = dict(first)
    for key, value in second.items():
        if key == "tool_calls":
            merged[key] = merge_call_entries(merged.get(key, []) + value)
        elif key in merged:
            merged[key] += value
        else:
            merged[key] = value
    return merged


@dataclass
class CompletionFormat:
    """Completions; choice i belongs to prompt i // n (a batch of prompts gives n choices each)."""

    meta: Meta
    n: int
    logprobs: bool
    echo_prompts: list[str] | None = None  # prompt texts, when echo is set
    include_usage: bool = False
    _offsets: dict[int, int] = field(default_factory=dict)  # choice -> text length so far

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        usage = {"usage": None} if self.include_usage else {}
        return self.meta.envelope("text_completion", [choice], **usage)

    def _echo(self, index: int) -> str:
        return self.echo_prompts[index // self.n] if self.echo_prompts else ""

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo_prompts:
            return []
        indexes = range(len(self.echo_prompts) * self.n)
        self._offsets = {i: len(self._echo(i)) for i in indexes}
        return [self._chunk(_choice(i, None, text=self._echo(i), logprobs=None)) for i in indexes]

    def chunk(self, out: Output) -> dict[str, Any] | None:
        if not (out.text or out.logprobs or out.finish_reason):
            return None
        offset = self._offsets.get(out.index, 0)
        self._offsets[out.index] = offset + len(out.text)
        logprobs = completion_logprobs(out.logprobs, offset) if self.logprobs else None
        return self._chunk(_choice(out.index, out.finish_reason, text=out.text, logprobs=logprobs))

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [self.meta.envelope("text_completion", [], usage=usage_dict(usage))]

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        bodies = [self._choice(c) for c in choices]
        return self.meta.envelope("text_completion", bodies, usage=usage_dict(usage))

    def _choice(self, c: Choice) -> dict[str, Any]:
        echo = self._echo(c.index)
        logprobs = completion_logprobs(c.logprobs, len(echo)) if self.logprobs else None
        return _choice(c.index, c.finish_reason, text=echo + c.text, logprobs=logprobs)


@dataclass
class NativeFormat:
    """/generate, in SGLang's shape; streamed events carry the new text and ids only."""

    meta: Meta
    n: int

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, out: Output) -> dict[str, Any] | None:
        return {
            "index": out.index,
            "text": out.text,
            "output_ids": out.token_ids,
            "meta_info": self._meta_info(out.finish_reason, None),
        }

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        return []

    def response(self, choices: list[Choice], usage: Usage) -> Any:
        bodies = [
            {
                "text": c.text,
                "output_ids": c.token_ids,
                "meta_info": self._meta_info(c.finish_reason, usage),
            }
            for c in choices
        ]
        return bodies[0] if self.n == 1 else bodies

    def _meta_info(self, reason: str | None, usage: Usage | None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": self.meta.id,
            "finish_reason": {"type": reason} if reason else None,
        }
        if usage is not None:
            info.update(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
            )
        return info


def model_card(name: str, created: int, context_length: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "radixserve",
        "max_model_len": context_length,
    }


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
