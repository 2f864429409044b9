"""The result types of tool-call parsing, shaped like OpenAI's `tool_calls`.

A whole answer parses to `ParsedOutput(content, calls)`; a stream yields `Delta`s, each either a
piece of content text (a `str`) or a `ToolCallDelta` shaped like one entry of a streamed
`choices[0].delta.tool_calls` list. `collect` folds deltas back into a `ParsedOutput`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field


def new_call_id() -> str:
    """An OpenAI-style call id: `call_` + 24 hex digits of a uuid4."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolCall:
    """One complete call: `arguments` is a JSON object as text, as OpenAI sends it,
    e.g. `ToolCall("call_3f…", "get_weather", '{"city": "Paris"}')`."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed `tool_calls` entry. The first delta of call `index` (0, 1, ... in order of
    appearance) carries `id` and `name` and an empty or whole `arguments`; later deltas of the
    same index carry only `arguments` text, to be concatenated."""

    index: int
    id: str | None
    name: str | None
    arguments: str


# A streamed piece: content text, or a piece of a tool call.
Delta = str | ToolCallDelta


@dataclass
class ParsedOutput:
    """A whole answer split into `content` (None when there is none) and its tool `calls`."""

    content: str | None
    calls: list[ToolCall] = field(default_factory=list)


def collect(deltas: Iterable[Delta]) -> ParsedOutput:
    """Fold a stream's deltas into the `ParsedOutput` they add up to."""
    text: list[str] = []
    heads: dict[int, ToolCallDelta] = {}
    args: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, str):
            text.append(d)
            continue
        if d.index not in heads:
            assert d.id is not None and d.name is not None, "a call's first delta names it"
            heads[d.index] = d
            args[d.index] = []
        args[d.index].append(d.arguments)
    calls = [
        ToolCall(heads[i].id or "", heads[i].name or "", "".join(args[i])) for i in sorted(heads)
    ]
    return ParsedOutput("".join(text) or None, calls)
