"""Tool-call formats: the text a model writes to call a function, parsed into OpenAI tool calls.

`TOOL_PARSERS[name]().parse(text)` parses a whole answer; `.stream()` parses it as it arrives
(`feed` each delta, then `finish`). Streamed in any pieces, the content adds up to the whole
parse's content and the calls to its calls (ids aside). Markup never leaks into content; markup
that turns out malformed (invalid JSON, unknown structure, cut short) is given back as plain
content, with one exception: once a call's name has been streamed it stays a call, and if its
arguments never complete they are `{}`.

Formats (each class documents its own):
- `hermes`: Hermes 2 Pro, Qwen 2.5, Qwen3, SmolLM2: `<tool_call>{...}</tool_call>`;
- `llama3_json`: Llama 3.1 / 3.2 JSON tool calling: `<|python_tag|>{"name": ..., "parameters": ...}`;
- `mistral`: `[TOOL_CALLS][{...}]` and `[TOOL_CALLS]name[ARGS]{...}`;
- `pythonic`: Llama 3.2 / Llama 4 pythonic: `[f(a=1), g()]`.
"""

from __future__ import annotations

import re
from typing import ClassVar

from services.gateway.tools.calls import ParsedOutput, collect
from services.gateway.tools.scanning import (
    BROKEN,
    INCOMPLETE,
    BracketSpan,
    holdback,
    loads_or_none,
    python_calls,
)
from services.gateway.tools.stream import (
    BROKEN_CALL,
    DEGRADE,
    DONE,
    ToolCallStream,
)


class ToolParser:
    """A tool-call format. Stateless: `parse` a whole answer, or `stream()` one."""

    name: ClassVar[str]
    # One paragraph telling a model how to write a call in this format (for a tool prompt).
    format_hint: ClassVar[str]
    stream_class: ClassVar[type[ToolCallStream]]

    def stream(self) -> ToolCallStream:
        """A fresh incremental parser for one answer."""
        return self.stream_class()

    def parse(self, text: str) -> ParsedOutput:
        """The content and calls of a whole answer (the same as streaming it in one piece)."""
        s = self.stream()
        return collect(s.feed(text) + s.finish())


# hermes -------------------------------------------------------------------------------------


class _HermesStream(ToolCallStream):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def _start(self) -> bool:
        return self._scan_text(self.OPEN, self._body)

    def _body(self) -> bool:
        states = {DONE: self._close, DEGRADE: self._start, BROKEN_CALL: self._discard}
        return self._goto(self._json_body(arrays=True), states)

    def _close(self) -> bool:
        """After a call's JSON: an optional `</tool_call>` (models sometimes stop before it)."""
        s = self._buf.lstrip()
        if s.startswith(self.CLOSE):
            s = s[len(self.CLOSE) :]
        elif self.CLOSE.startswith(s) and not self._final:
            return False
        self._buf = s
        self._state = self._start
        return True

    def _discard(self) -> bool:
        """The rest of a broken call, up to and including `</tool_call>`."""
        i = self._buf.find(self.CLOSE)
        if i >= 0:
            self._buf = self._buf[i + len(self.CLOSE) :]
            self._state = self._start
            return True
        keep = len(self._buf) if self._final else holdback(self._buf, self.CLOSE)
        self._buf = self._buf[keep:]
        return False


class HermesToolParser(ToolParser):
    """Hermes-style calls: free text, then one or more JSON calls wrapped in tags, e.g.

        I'll check both.
        <tool_call>
        {"name": "get_weather", "arguments": {"city": "Paris"}}
        </tool_call>
        <tool_call>
        {"name": "get_time", "arguments": {"tz": "CET"}}
        </tool_call>

    From NousResearch's Hermes 2 Pro function-calling format, adopted by the Qwen 2.5 and Qwen3
    chat templates (vLLM / SGLang parser `hermes` / `qwen25`). A tag may also hold a JSON list of
    calls, `<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`, SmolLM2's form
    (its APIGen-style tool-calling data); `"parameters"` is accepted for `"arguments"`, and a
    missing `</tool_call>` at the end is tolerated. The name is streamed as soon as
    `{"name": "...",` is complete; the arguments when the object closes.
    """

    name = "hermes"
    format_hint = (
        "To call a function, write a <tool_call></tool_call> block holding a JSON object with "
        'the function\'s "name" and its "arguments" as a JSON object, e.g.\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        "Write one block per call; nothing but the JSON object goes inside a block."
    )
    stream_class = _HermesStream


# llama3_json --------------------------------------------------------------------------------


class _Llama3JsonStream(ToolCallStream):
    TAG = "<|python_tag|>"

    def _start(self) -> bool:
        """A bare `{` first (after whitespace) opens calls; else text until `<|python_tag|>`."""
        s = self._buf.lstrip()
        if not s and not self._final:
            return False
        if s.startswith("{"):
            self._content(self._buf[: len(self._buf) - len(s)])
            self._buf = s
            self._begin_body("")
            self._state = self._object
        else:
            self._state = self._text
        return True

    def _text(self) -> bool:
        return self._scan_text(self.TAG, self._object)

    def _object(self) -> bool:
        states = {DONE: self._separator, DEGRADE: self._text, BROKEN_CALL: self._discard_to_end}
        return self._goto(self._json_body(arrays=False), states)

    def _separator(self) -> bool:
        """`;` then the next call; a trailing `;` is dropped; anything else is content."""
        s = self._buf.lstrip()
        if s.startswith(";"):
            rest = s[1:].lstrip()
            if not rest:
                if not self._final:
                    return False
                self._buf = ""
                return False
            self._buf = rest
            self._begin_body(";")
            self._state = self._object
            return True
        if not s and not self._final:
            return False
        self._buf = s
        self._state = self._text
        return True


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 / 3.2 JSON tool calling: the answer is one or more JSON calls separated by `;`,
    optionally after `<|python_tag|>` (which may follow some text), e.g.

        <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

    From Meta's Llama 3.1 model card and chat template ("JSON based tool calling"; vLLM
    `llama3_json`, SGLang `llama3`). `"arguments"` is accepted for `"parameters"`. Without the tag
    only an answer that starts with `{` is read as calls, so a plain JSON answer that is not a
    call is held until its closing brace and then given back as content.
    """

    name = "llama3_json"
    format_hint = (
        "To call a function, answer with only a JSON object of the form "
        '{"name": function name, "parameters": object of argument names and values}, e.g. '
        '{"name": "get_weather", "parameters": {"city": "Paris"}}. '
        "To make several calls, separate the objects with a semicolon (;)."
    )
    stream_class = _Llama3JsonStream


# mistral ------------------------------------------------------------------------------------

_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]*")


def _mistral_head(s: str) -> tuple[str, int] | bool | None:
    """For `s` = `name[CALL_ID]id[ARGS]{...`: (name, index of `{`); None while undecided;
    False when `s` cannot start a named call. `[CALL_ID]id` and `[ARGS]` are optional (the
    special tokens may have been dropped by detokenization)."""
    m = _MISTRAL_NAME.match(s)
    if not m:
        return False
    i = m.end()
    if i == len(s):
        return None
    if s.startswith("[CALL_ID]", i):
        i = _MISTRAL_ID.match(s, i + len("[CALL_ID]")).end()  # type: ignore[union-attr]
    elif "[CALL_ID]".startswith(s[i:]):
        return None
    if s.startswith("[ARGS]", i):
        i += len("[ARGS]")
    elif "[ARGS]".startswith(s[i:]):
        return None
    j = len(s) - len(s[i:].lstrip())
    if j == len(s):
        return None
    return (m.group(), j) if s[j] == "{" else False


class _MistralStream(ToolCallStream):
    MARK = "[TOOL_CALLS]"

    def _start(self) -> bool:
        return self._scan_text(self.MARK, self._kind)

    def _kind(self) -> bool:
        """A JSON list or object of calls, or the `name[ARGS]{...}` form."""
        s = self._buf.lstrip()
        if not s and not self._final:
            return False
        self._state = self._json if s[:1] in ("[", "{") else self._head
        return True

    def _json(self) -> bool:
        states = {DONE: self._start, DEGRADE: self._start, BROKEN_CALL: self._discard_to_end}
        return self._goto(self._json_body(arrays=True), states)

    def _head(self) -> bool:
        s = self._buf.lstrip()
        head = _mistral_head(s)
        if head is None and not self._final:
            return False
        if not isinstance(head, tuple):
            self._degrade()
            self._state = self._start
            return True
        name, brace = head
        self._open_call(name)
        self._buf = s[brace:]
        self._span = BracketSpan()
        self._state = self._args
        return True

    def _args(self) -> bool:
        end = self._span.scan(self._buf)
        if end == INCOMPLETE and not self._final:
            return False
        if end in (INCOMPLETE, BROKEN):
            self._close_call({})
            self._state = self._discard_to_end
            return True
        args = loads_or_none(self._buf[:end])
        self._close_call(args if isinstance(args, dict) else {})
        self._buf = self._buf[end:]
        self._state = self._start
        return True


class MistralToolParser(ToolParser):
    """Mistral's `[TOOL_CALLS]` marker, after optional text, followed by either a JSON list of
    calls (tokenizer v3 to v7: Mistral 7B v0.3, Mixtral 8x22B, Nemo, Small 3)

        [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

    or, from tokenizer v11 on (Mistral Small 3.1+, Devstral, Magistral), one marker per call:

        [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

    (with an optional `[CALL_ID]id` before `[ARGS]`). From mistral-common's tokenizers (vLLM and
    SGLang parser `mistral`). The marker is a special token: the answer must be detokenized with
    special tokens kept. Call ids are ours (`call_...`), not Mistral's 9-character ones.
    """

    name = "mistral"
    format_hint = (
        "To call functions, write [TOOL_CALLS] followed by a JSON list of calls, each an object "
        'with the function\'s "name" and its "arguments" as a JSON object, e.g. '
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    )
    stream_class = _MistralStream


# pythonic -----------------------------------------------------------------------------------


class _PythonicStream(ToolCallStream):
    START, END = "<|python_start|>", "<|python_end|>"

    def _start(self) -> bool:
        """The answer is calls only if it starts (after whitespace and an optional
        `<|python_start|>`) with `[`."""
        s = self._buf.lstrip()
        if s.startswith(self.START):
            s = s[len(self.START) :].lstrip()
        elif self.START.startswith(s) and not self._final:
            return False
        if not s and not self._final:
            return False
        if not s.startswith("["):
            self._state = self._plain
            return True
        self._raw = self._buf[: len(self._buf) - len(s)]
        self._buf = s
        self._span = BracketSpan(python=True)
        self._state = self._list
        return True

    def _list(self) -> bool:
        end = self._span.scan(self._buf)
        if end == INCOMPLETE and not self._final:
            return False
        calls = python_calls(self._buf[:end]) if end >= 0 else None
        if calls is None:
            self._degrade()
            self._state = self._plain
            return True
        for name, args in calls:
            self._open_call(name, args)
        self._buf = self._buf[end:]
        self._state = self._end
        return True

    def _end(self) -> bool:
        """An optional `<|python_end|>`; what follows is content."""
        s = self._buf.lstrip()
        if s.startswith(self.END):
            s = s[len(self.END) :]
        elif self.END.startswith(s) and not self._final:
            return False
        self._buf = s
        self._state = self._plain
        return True


class PythonicToolParser(ToolParser):
    """Calls written as a Python list of function calls with literal keyword arguments, e.g.

        [get_weather(city="Paris", days=3), get_time()]

    optionally inside `<|python_start|>` / `<|python_end|>`. From Llama 3.2's and Llama 4's
    "pythonic" tool-calling templates (vLLM `pythonic` / `llama4_pythonic`, SGLang `pythonic`).
    The answer must start with the list; arguments must be literals (strings, numbers, True /
    False / None or true / false / null, lists, tuples, dicts), read with `ast` and never
    evaluated, and become a JSON object. Anything else leaves the answer as plain content.
    """

    name = "pythonic"
    format_hint = (
        "To call functions, answer with only a Python list of calls with keyword arguments and "
        'literal values, e.g. [get_weather(city="Paris", days=3), get_time()]'
    )
    stream_class = _PythonicStream


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p
    for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


# Checked in order against the lowercased "architecture model_name"; the first match wins.
_DEFAULTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), parser)
    for pattern, parser in (
        ("hermes", "hermes"),  # Hermes fine-tunes of Llama or Mistral keep Hermes' format
        ("smollm", "hermes"),  # SmolLM2 writes <tool_call>[...]</tool_call>
        ("qwen2|qwen3", "hermes"),
        (r"llama-?4(?!\d)", "pythonic"),
        (r"llama-?3(?!\d)", "llama3_json"),
        ("mistral|mixtral", "mistral"),
    )
)


def default_tool_parser(architecture: str, model_name: str) -> str | None:
    """The tool parser for a model family, or None when the family is unknown.

    `architecture` is config.json's `architectures[0]` (e.g. "Qwen2ForCausalLM"); `model_name`
    its name or path (e.g. "meta-llama/Llama-3.1-8B-Instruct"), needed because LlamaForCausalLM
    covers Llama 2, Llama 3 and SmolLM2 alike. Qwen2 / Qwen2.5 / Qwen3, Hermes and SmolLM2 →
    hermes; Llama 3.x → llama3_json; Llama 4 → pythonic; Mistral / Mixtral → mistral.
    """
    key = f"{architecture} {model_name}".lower()
    return next((parser for pattern, parser in _DEFAULTS if pattern.search(key)), None)
