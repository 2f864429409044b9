"""OpenAI (and native /generate) response bodies and stream chunks, built from gateway outputs.

A format turns one request's outputs into JSON-ready dicts: `opening(usage)` chunks before any
output, `chunk(out, usage)` per output, `closing(usage)` after the last, or
`response(choices, usage)` at once (`usage`: the request's so far).

As vLLM and SGLang do, a choice's last tokens and its `finish_reason` share one chunk; a chunk
goes out for every output that consumed tokens, even when their text is held back (a stop string
may start there, a character is not complete yet). Each finished choice names what stopped it
in `matched_stop` (SGLang): the stop string or regex, the stop token id, or null.
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
    matched_stop: str | int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, when asked

    def add(self, out: Output) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason:
            self.finish_reason, self.matched_stop = out.finish_reason, out.matched_stop


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


@dataclass(frozen=True)
class ResponseOptions:
    """What a request asked of its answer besides the choices."""

    include_usage: bool = False  # streamed: a last chunk with the usage
    continuous_usage: bool = False  # streamed: every chunk carries the usage so far (vLLM)
    prompt_ids: tuple[list[int], ...] | None = None  # return_token_ids: each prompt's ids
    echo: tuple[str, ...] | None = None  # the text put before each prompt's answers
    prompt_pieces: tuple[list[str], ...] | None = None  # echo + logprobs: each prompt token's text

    def usage(self, usage: Usage) -> dict[str, Any]:
        """A chunk's `usage` field (none unless include_usage)."""
        if not self.include_usage:
            return {}
        return {"usage": usage_dict(usage) if self.continuous_usage else None}


class Format(Protocol):
    def opening(self, usage: Usage) -> list[dict[str, Any]]: ...
    def chunk(
        self, out: Output, usage: Usage
    ) -> dict[str, Any] | list[dict[str, Any]] | None: ...  # None: nothing to send
    def closing(self, usage: Usage) -> list[dict[str, Any]]: ...
    def response(self, choices: list[Choice], usage: Usage) -> Any: ...


def _prompt_only(usage: Usage) -> Usage:
    """The usage before any output (what an opening chunk reports)."""
    return Usage(usage.prompt_tokens, 0, usage.cached_tokens)


def _token_ids(ids: list[int], matched_stop: str | int | None) -> list[int]:
    """The ids a choice generated, with the stop token that ended it (vLLM's `token_ids`,
    SGLang's `output_ids`): the scheduler's chunks leave that token out of their ids."""
    return [*ids, matched_stop] if isinstance(matched_stop, int) else ids


def _ended(finish_reason: str | None, matched_stop: str | int | None) -> dict[str, Any]:
    """SGLang's `matched_stop` on a finished choice."""
    return {"matched_stop": matched_stop} if finish_reason else {}


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


def echo_logprobs(
    prompt: list[TokenLogprob | None], pieces: list[str], output: list[TokenLogprob]
) -> dict[str, Any]:
    """`choices[i].logprobs` of an echoed completion (OpenAI's legacy shape, as vLLM answers and
    lm-evaluation-harness reads it): every prompt token first — `pieces` are their texts — with
    null logprob and alternatives where the prompt has none (its first token), then the output's."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    tail = completion_logprobs(output, at)
    return {
        "tokens": [*pieces, *tail["tokens"]],
        "token_logprobs": [None if e is None else _logprob(e.logprob) for e in prompt]
        + tail["token_logprobs"],
        "top_logprobs": [None if e is None else _top_dict(e) for e in prompt]
        + tail["top_logprobs"],
        "text_offset": offsets + tail["text_offset"],
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
    options: ResponseOptions = ResponseOptions()
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

    @property
    def _echo(self) -> str:
        return self.options.echo[0] if self.options.echo else ""

    def _chunk(self, choice: dict[str, Any], usage: Usage, **extra: Any) -> dict[str, Any]:
        fields = {**extra, **self.options.usage(usage)}
        return self.meta.envelope("chat.completion.chunk", [choice], **fields)

    def opening(self, usage: Usage) -> list[dict[str, Any]]:
        before = _prompt_only(usage)
        ids = self.options.prompt_ids
        extra = {"prompt_token_ids": ids[0]} if ids else {}
        role = {"role": "assistant", "content": ""}
        chunks = [
            self._chunk(_choice(i, None, delta=role, logprobs=None), before, **extra)
            for i in range(self.n)
        ]
        if self._echo:
            echo = {"content": self._echo}
            chunks += [
                self._chunk(_choice(i, None, delta=echo, logprobs=None), before)
                for i in range(self.n)
            ]
        return chunks

    def chunk(self, out: Output, usage: Usage) -> dict[str, Any] | None:
        answer = None
        if self._split:
            answer = self._answer(out.index)
            delta = answer.feed(out.text)
            if out.finish_reason:
                delta = _merge_delta(delta, answer.finish())
        else:
            delta = {"content": out.text} if out.text or out.token_ids else {}
        wanted = self.logprobs and out.logprobs
        ids = self.options.prompt_ids is not None and (out.token_ids or out.finish_reason)
        if not (delta or wanted or ids or out.finish_reason):
            return None
        fields: dict[str, Any] = {"delta": delta}
        fields["logprobs"] = {"content": chat_logprobs(out.logprobs)} if wanted else None
        if self.options.prompt_ids is not None:
            fields["token_ids"] = _token_ids(out.token_ids, out.matched_stop)
        fields.update(_ended(out.finish_reason, out.matched_stop))
        reason = self._finish_reason(out.finish_reason, answer)
        return self._chunk(_choice(out.index, reason, **fields), usage)

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        if not self.options.include_usage:
            return []
        return [self.meta.envelope("chat.completion.chunk", [], usage=usage_dict(usage))]

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        bodies = [self._choice(c) for c in choices]
        ids = self.options.prompt_ids
        extra = {"prompt_token_ids": ids[0]} if ids else {}
        return self.meta.envelope("chat.completion", bodies, usage=usage_dict(usage), **extra)

    def _choice(self, c: Choice) -> dict[str, Any]:
        logprobs = {"content": chat_logprobs(c.logprobs)} if self.logprobs else None
        reason = c.finish_reason
        if not self._split:
            message: dict[str, Any] = {"role": "assistant", "content": self._echo + c.text}
        else:
            answer = self._answer(c.index)
            message = {"role": "assistant", **answer.message(c.text)}
            if self._echo:
                message["content"] = self._echo + (message["content"] or "")
            reason = self._finish_reason(c.finish_reason, answer)
        fields: dict[str, Any] = {"message": message, "logprobs": logprobs}
        if self.options.prompt_ids is not None:
            fields["token_ids"] = _token_ids(c.token_ids, c.matched_stop)
        fields["matched_stop"] = c.matched_stop
        return _choice(c.index, reason, **fields)


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
    options: ResponseOptions = ResponseOptions()
    _offsets: dict[int, int] = field(default_factory=dict)  # choice -> text length so far
    _opened: set[int] = field(default_factory=set)  # choices that have had a chunk

    def _chunk(self, choice: dict[str, Any], usage: Usage) -> dict[str, Any]:
        return self.meta.envelope("text_completion", [choice], **self.options.usage(usage))

    def _echo(self, index: int) -> str:
        return self.options.echo[index // self.n] if self.options.echo else ""

    def _prompt_ids(self, index: int) -> dict[str, Any]:
        """vLLM's `prompt_token_ids` of a choice: in its first chunk only, when streamed."""
        ids = self.options.prompt_ids
        if ids is None or index in self._opened:
            return {}
        self._opened.add(index)
        return {"prompt_token_ids": ids[index // self.n]}

    def opening(self, usage: Usage) -> list[dict[str, Any]]:
        if not self.options.echo:
            return []
        indexes = range(len(self.options.echo) * self.n)
        self._offsets = {i: len(self._echo(i)) for i in indexes}
        before = _prompt_only(usage)
        return [
            self._chunk(
                _choice(i, None, text=self._echo(i), logprobs=None, **self._prompt_ids(i)), before
            )
            for i in indexes
        ]

    def chunk(self, out: Output, usage: Usage) -> dict[str, Any] | None:
        if not (out.text or out.token_ids or out.logprobs or out.finish_reason):
            return None
        offset = self._offsets.get(out.index, 0)
        self._offsets[out.index] = offset + len(out.text)
        fields: dict[str, Any] = {"text": out.text}
        fields["logprobs"] = completion_logprobs(out.logprobs, offset) if self.logprobs else None
        fields.update(self._prompt_ids(out.index))
        if self.options.prompt_ids is not None:
            fields["token_ids"] = _token_ids(out.token_ids, out.matched_stop)
        fields.update(_ended(out.finish_reason, out.matched_stop))
        return self._chunk(_choice(out.index, out.finish_reason, **fields), usage)

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        if not self.options.include_usage:
            return []
        return [self.meta.envelope("text_completion", [], usage=usage_dict(usage))]

    def response(self, choices: list[Choice], usage: Usage) -> dict[str, Any]:
        bodies = [self._choice(c) for c in choices]
        return self.meta.envelope("text_completion", bodies, usage=usage_dict(usage))

    def _choice(self, c: Choice) -> dict[str, Any]:
        echo = self._echo(c.index)
        logprobs = completion_logprobs(c.logprobs, len(echo)) if self.logprobs else None
        if self.logprobs and c.prompt_logprobs is not None:
            pieces = self.options.prompt_pieces[c.index // self.n]
            logprobs = echo_logprobs(c.prompt_logprobs, pieces, c.logprobs)
        fields: dict[str, Any] = {"text": echo + c.text, "logprobs": logprobs}
        if self.options.prompt_ids is not None:
            fields["prompt_token_ids"] = self.options.prompt_ids[c.index // self.n]
            fields["token_ids"] = _token_ids(c.token_ids, c.matched_stop)
        fields["matched_stop"] = c.matched_stop
        return _choice(c.index, c.finish_reason, **fields)


class UsageSource(Protocol):
    """What counts one prompt's tokens (its Generation)."""

    @property
    def usage(self) -> Usage: ...


@dataclass(frozen=True)
class NativePrompt:
    """One prompt of a /generate request: its request id (its samples' `meta_info.id`), its
    token ids, their texts (with `return_text_in_logprobs`), and what counts its tokens (None:
    the request's usage)."""

    id: str
    ids: list[int]
    pieces: list[str] = field(default_factory=list)
    counts: UsageSource | None = None


@dataclass
class NativeFormat:
    """/generate, in SGLang's shape. Streamed events are cumulative, as SGLang's are: each
    carries the sample's whole `text` and `output_ids` so far, and meta_info with the token
    counts so far. As in SGLang, `output_ids` ends with the stop token that ended a sample, and
    each sample's `completion_tokens` is its own: the length of its `output_ids`. With
    `logprobs` (return_logprob), meta_info carries SGLang's logprob lists: each entry
    `[logprob, token_id, text]` (text null unless `text_in_logprobs`),
    `output_token_logprobs` and `output_top_logprobs` for the generated tokens,
    `input_token_logprobs` and `input_top_logprobs` for the prompt from logprob_start_len (a null
    logprob for the first token).

    A batch (`batched`: several prompts, or one sent as a list) answers a list of every prompt's
    samples in order (prompt k's at k * n .. k * n + n - 1, the `index` of their stream events),
    each with its prompt's `meta_info.id` and `prompt_tokens`; so does one prompt with n > 1."""

    meta: Meta
    n: int
    logprobs: bool = False
    text_in_logprobs: bool = False
    logprob_start: int = 0  # the first prompt position listed (logprob_start_len)
    prompts: list[NativePrompt] = field(default_factory=list)  # empty: one prompt, meta.id
    batched: bool = False
    _sofar: dict[int, Output] = field(default_factory=dict, init=False)  # streamed, per sample

    def opening(self, usage: Usage) -> list[dict[str, Any]]:
        return []

    def chunk(self, out: Output, usage: Usage) -> dict[str, Any] | None:
        sofar = self._sofar.setdefault(out.index, Output(out.index, ""))
        sofar.text += out.text  # lists grow in place: sse serializes each event as it is made
        sofar.token_ids.extend(out.token_ids)
        sofar.logprobs.extend(out.logprobs)
        sofar.prompt_logprobs = out.prompt_logprobs or sofar.prompt_logprobs
        prompt = self._prompt(out.index)
        ids = _token_ids(sofar.token_ids, out.matched_stop)
        info = self._meta_info(
            prompt, out.finish_reason, out.matched_stop, self._own(prompt, usage, ids)
        )
        info.update(self._logprobs(prompt, sofar.logprobs, sofar.prompt_logprobs))
        return {"index": out.index, "text": sofar.text, "output_ids": ids, "meta_info": info}

    def closing(self, usage: Usage) -> list[dict[str, Any]]:
        return []

    def response(self, choices: list[Choice], usage: Usage) -> Any:
        # One prompt's logprobs come with each of its samples; take them from any.
        prompts: dict[int, list[TokenLogprob | None]] = {}
        for c in choices:
            if c.prompt_logprobs:
                prompts.setdefault(c.index // self.n, c.prompt_logprobs)
        bodies = []
        for c in choices:
            prompt = self._prompt(c.index)
            ids = _token_ids(c.token_ids, c.matched_stop)
            info = self._meta_info(
                prompt, c.finish_reason, c.matched_stop, self._own(prompt, usage, ids)
            )
            info.update(self._logprobs(prompt, c.logprobs, prompts.get(c.index // self.n)))
            bodies.append({"text": c.text, "output_ids": ids, "meta_info": info})
        return bodies if self.batched or self.n > 1 else bodies[0]

    def _prompt(self, index: int) -> NativePrompt:
        """The prompt of sample `index` (without `prompts`: one, known by the request's id)."""
        return self.prompts[index // self.n] if self.prompts else NativePrompt(self.meta.id, [])

    @staticmethod
    def _own(prompt: NativePrompt, usage: Usage, ids: list[int]) -> Usage:
        """The sample's prompt counts (its prompt's, where they are kept) with its own
        completion tokens."""
        return _own(prompt.counts.usage if prompt.counts is not None else usage, ids)

    def _entry(self, lp: TokenLogprob | None, token_id: int, piece: str) -> list[Any]:
        value = None if lp is None else _logprob(lp.logprob)
        return [value, token_id, piece if self.text_in_logprobs else None]

    def _tops(self, lp: TokenLogprob | None) -> list[list[Any]] | None:
        if lp is None:
            return None
        return [
            self._entry(TokenLogprob(p, v, []), t, p.text)
            for (p, v), t in zip(lp.top, lp.top_ids, strict=True)
        ]

    def _logprobs(
        self,
        source: NativePrompt,
        output: list[TokenLogprob],
        prompt: list[TokenLogprob | None] | None,
    ) -> dict[str, Any]:
        if not self.logprobs:
            return {}
        fields: dict[str, Any] = {
            "output_token_logprobs": [self._entry(lp, lp.token_id, lp.token.text) for lp in output],
            "output_top_logprobs": [self._tops(lp) for lp in output],
        }
        if prompt is not None:
            positions = range(self.logprob_start, len(prompt))
            pieces = source.pieces or [""] * len(prompt)
            fields["input_token_logprobs"] = [
                self._entry(prompt[i], source.ids[i], pieces[i]) for i in positions
            ]
            fields["input_top_logprobs"] = [self._tops(prompt[i]) for i in positions]
        return fields

    def _meta_info(
        self,
        source: NativePrompt,
        reason: str | None,
        matched: str | int | None,
        usage: Usage | None,
    ) -> dict[str, Any]:
        finish: dict[str, Any] | None = {"type": reason} if reason else None
        if finish is not None and matched is not None:
            finish["matched"] = matched  # SGLang: the stop string or token id
        info: dict[str, Any] = {"id": source.id, "finish_reason": finish}
        if usage is not None:
            info.update(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
            )
        return info


def _own(usage: Usage, ids: list[int]) -> Usage:
    """The request's prompt counts with one sample's completion tokens."""
    return Usage(usage.prompt_tokens, len(ids), usage.cached_tokens)


def model_card(name: str, created: int, context_length: int, root: str = "") -> dict[str, Any]:
    """A model object as vLLM lists it: `root` is where the weights came from (the name when
    unknown); `parent` is null (no adapters are served)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "radixserve",
        "root": root or name,
        "parent": None,
        "max_model_len": context_length,
    }


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
