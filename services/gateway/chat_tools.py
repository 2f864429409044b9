"""Tools and reasoning of a chat request: which calls the model may or must make, and its answer
split into reasoning, content and OpenAI tool calls.

`tool_choice` (OpenAI semantics; legacy `functions` / `function_call` map onto it):

- `none`: the tools are shown to the chat template, the answer is plain content (no parsing).
- `auto` (the default with tools): free generation; the `--tool-call-parser` format (hermes,
  llama3_json, mistral, pythonic) is parsed out of the answer into `tool_calls`.
- `required`: generation is constrained to a JSON array of calls `[{"name", "arguments"}]` whose
  names are the tools' and whose arguments validate against each tool's JSON schema (at most one
  call with `parallel_tool_calls: false`); the array is the answer's calls.
- a named function: generation is constrained to that function's arguments (its schema).

With a reasoning parser, the text up to the end of the think section goes to `reasoning_content`
(also sent as `reasoning`, vLLM's current name) and only the rest is parsed for calls. A choice
with calls ends with `finish_reason: "tool_calls"` when it stopped by itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.common.grammar import GrammarSpec
from services.gateway.errors import InvalidRequest
from services.gateway.tools.calls import ToolCall, ToolCallDelta, new_call_id
from services.gateway.tools.parsers import TOOL_PARSERS
from services.gateway.tools.reasoning import CONTENT, REASONING, REASONING_PARSERS

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools. `functions`: name → parameters schema, in order."""

    mode: str  # "none" | "auto" | "required" | "named"
    functions: tuple[tuple[str, dict[str, Any]], ...]
    name: str | None = None  # the named function
    parallel: bool = True  # more than one call allowed
    parser: str | None = None  # auto: the format parsed out of the answer (None: no parsing)

    def grammar(self) -> GrammarSpec | None:
        """The constraint `required` and a named function put on generation (None otherwise)."""
        if self.mode == "named":
            return GrammarSpec.json_schema(dict(self.functions)[self.name or ""])
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
            }
            for name, params in self.functions
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
        }
        if not self.parallel:
            schema["maxItems"] = 1
        return GrammarSpec.json_schema(schema)


def after_reasoning(spec: GrammarSpec, reasoning_parser: str) -> GrammarSpec:
    """`spec` applied after the answer's think section, the section itself free text: an xgrammar
    structural tag. `deepseek-r1` answers start inside the section (it ends at `</think>`);
    `qwen3` answers may open one with `<think>`. A structural tag is returned as it is."""
    content = _tag_content(spec)
    if content is None:
        return spec
    implicit = REASONING_PARSERS[reasoning_parser].implicit_think
    think = {
        "type": "tag",
        "begin": "" if implicit else "<think>",
        "content": {"type": "any_text"},
        "end": "</think>",
    }
    fmt: dict[str, Any] = {"type": "sequence", "elements": [think, content]}
    if not implicit:
        fmt = {"type": "or", "elements": [fmt, content]}
    return GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": fmt}))


def _tag_content(spec: GrammarSpec) -> dict[str, Any] | None:
    if spec.kind == "json_schema":
        return {"type": "json_schema", "json_schema": json.loads(spec.spec)}
    if spec.kind == "json_object":
        return {"type": "json_schema", "json_schema": {"type": "object"}}
    if spec.kind == "regex":
        return {"type": "regex", "pattern": spec.spec}
    if spec.kind == "ebnf":
        return {"type": "grammar", "grammar": spec.spec}
    return None


def plan_tools(
    functions: list[dict[str, Any]],
    tool_choice: str | dict[str, Any] | None,
    parallel: bool | None,
    parser: str | None,
    param: str = "tool_choice",
) -> ToolPlan | None:
    """The plan for a request's functions (`{"name", "parameters"?}` dicts) and tool_choice;
    InvalidRequest (naming `param`) for a choice the functions cannot satisfy."""
    if not functions:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest(f"'{param}' needs 'tools'", param=param)
        return None
    schemas = tuple((f["name"], f.get("parameters") or ANY_OBJECT) for f in functions)
    names = [name for name, _ in schemas]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool function names must be unique", param="tools")
    allow_many = parallel is not False
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", tool_choice).get("name")
        if name not in names:
            raise InvalidRequest(
                f"'{param}' names function {name!r}, which is not among the tools", param=param
            )
        return ToolPlan("named", schemas, name=name, parallel=False)
    mode = tool_choice or "auto"
    return ToolPlan(mode, schemas, parallel=allow_many, parser=parser if mode == "auto" else None)


def check_parsers(tool_parser: str | None, reasoning_parser: str | None) -> None:
    """ValueError naming an unknown parser (for the gateway's flags)."""
    if tool_parser is not None and tool_parser not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser must be one of {sorted(TOOL_PARSERS)}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"--reasoning-parser must be one of {sorted(REASONING_PARSERS)}")


def call_dict(call: ToolCall) -> dict[str, Any]:
    """A message's `tool_calls` entry."""
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def delta_dict(d: ToolCallDelta) -> dict[str, Any]:
    """A streamed `delta.tool_calls` entry: the first of a call names it, the rest carry
    arguments text only."""
    entry: dict[str, Any] = {"index": d.index}
    if d.id is not None:
        entry["id"], entry["type"] = d.id, "function"
        entry["function"] = {"name": d.name, "arguments": d.arguments}
    else:
        entry["function"] = {"arguments": d.arguments}
    return entry


class Answer:
    """One choice's text, split into reasoning, content and tool calls; streamed (`feed`, then
    `finish`) or whole (`message`). Each call returns the delta / message fields to send."""

    def __init__(self, plan: ToolPlan | None, reasoning_parser: str | None) -> None:
        self.plan = plan
        self.mode = plan.mode if plan is not None else "none"
        self.reasoning = REASONING_PARSERS[reasoning_parser]() if reasoning_parser else None
        self._think = self.reasoning.stream() if self.reasoning else None
        parser = plan.parser if plan is not None and self.mode == "auto" else None
        self._calls = TOOL_PARSERS[parser]().stream() if parser else None
        self._held = ""  # required / named: the constrained JSON so far
        self._named_id: str | None = None
        self.called = False  # a tool call was emitted

    # ---- streaming -------------------------------------------------------------------------------

    def feed(self, text: str) -> dict[str, Any]:
        if self._think is None:
            return self._content_fields(text, final=False)
        return self._split(self._think.feed(text), final=False)

    def finish(self) -> dict[str, Any]:
        if self._think is None:
            return self._content_fields("", final=True)
        return self._split(self._think.finish(), final=True)

    def _split(self, pieces: list[tuple[str, str]], final: bool) -> dict[str, Any]:
        reasoning = "".join(t for kind, t in pieces if kind == REASONING)
        content = "".join(t for kind, t in pieces if kind == CONTENT)
        fields = self._content_fields(content, final)
        if reasoning:
            fields["reasoning_content"] = fields["reasoning"] = reasoning
        return fields

    def _content_fields(self, text: str, final: bool) -> dict[str, Any]:
        """Delta fields for a piece of post-reasoning text."""
        if self.mode == "named":
            return self._named(text, final)
        if self.mode == "required":
            self._held += text
            return self._required_fields() if final else {}
        if self._calls is None:
            return {"content": text} if text else {}
        deltas = self._calls.feed(text) + (self._calls.finish() if final else [])
        content = "".join(d for d in deltas if isinstance(d, str))
        calls = [d for d in deltas if isinstance(d, ToolCallDelta) and self._allowed(d.index)]
        fields: dict[str, Any] = {"content": content} if content else {}
        if calls:
            self.called = True
            fields["tool_calls"] = _merged(calls)
        return fields

    def _named(self, text: str, final: bool) -> dict[str, Any]:
        """The answer is the named function's arguments: streamed as they come."""
        assert self.plan is not None
        self._held += text
        if self._named_id is None and (text or final):
            self._named_id = new_call_id()
            self.called = True
            head = ToolCallDelta(0, self._named_id, self.plan.name, text)
            return {"tool_calls": [delta_dict(head)]}
        if not text:
            return {}
        return {"tool_calls": [delta_dict(ToolCallDelta(0, None, None, text))]}

    def _required_fields(self) -> dict[str, Any]:
        calls = self._required_calls(self._held)
        if calls is None:
            return {"content": self._held} if self._held else {}
        self.called = True
        deltas = [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
        return {"tool_calls": [delta_dict(d) for d in deltas]}

    def _allowed(self, index: int) -> bool:
        return self.plan is None or self.plan.parallel or index == 0

    # ---- whole answer ----------------------------------------------------------------------------

    def message(self, text: str) -> dict[str, Any]:
        """The `message` fields besides `role` for a whole answer."""
        reasoning, content = (None, text)
        if self.reasoning is not None:
            reasoning, content = self.reasoning.parse(text)
        content = content or ""
        calls: list[ToolCall] = []
        if self.mode == "named":  # as streamed: the call, with the arguments generated so far
            assert self.plan is not None and self.plan.name is not None
            calls = [ToolCall(new_call_id(), self.plan.name, content)]
        elif self.mode == "required":
            calls = self._required_calls(content) or []
        elif self._calls is not None and self.plan is not None:
            assert self.plan.parser is not None
            parsed = TOOL_PARSERS[self.plan.parser]().parse(content)
            calls = parsed.calls if self.plan.parallel else parsed.calls[:1]
            content = parsed.content or ""
        if calls:
            self.called = True
            if self.mode in ("named", "required"):
                content = ""
        fields: dict[str, Any] = {"content": content or (None if calls else "")}
        if calls:
            fields["tool_calls"] = [call_dict(c) for c in calls]
        if self.reasoning is not None:
            fields["reasoning_content"] = fields["reasoning"] = reasoning
        return fields

    @staticmethod
    def _required_calls(text: str) -> list[ToolCall] | None:
        """The calls of a `required` answer (a JSON array); cut short (by max_tokens), the calls
        it completed; None when it completed none."""
        try:
            value = json.loads(text)
        except ValueError:
            value = _complete_items(text)
        if not isinstance(value, list) or not value:
            return None
        calls = []
        for item in value:
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                return None
            args = json.dumps(item.get("arguments", {}), ensure_ascii=False)
            calls.append(ToolCall(new_call_id(), item["name"], args))
        return calls


def _complete_items(text: str) -> list[Any]:
    """The complete items at the start of a JSON array cut short: `[{...}, {...}, {"na` gives
    the first two."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return []
    items: list[Any] = []
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\n\r,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return items
        items.append(item)


def _merged(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Deltas of one chunk as `delta.tool_calls` entries, one per call index."""
    return merge_call_entries([delta_dict(d) for d in deltas])


def merge_call_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`delta.tool_calls` entries with one per call index (arguments of later ones appended)."""
    by_index: dict[int, dict[str, Any]] = {}
    for entry in entries:
        first = by_index.get(entry["index"])
        if first is None:
            by_index[entry["index"]] = {**entry, "function": dict(entry["function"])}
        else:
            first["function"]["arguments"] += entry["function"]["arguments"]
    return list(by_index.values())
