"""Incremental scanners the parsers share: where a marker may be starting, where a JSON value or a
Python list ends, and turning a Python call list into JSON-able values with `ast` (never eval).

The scanners are resumable: the text they scan only ever grows at its end (a stream's buffer), so
each call continues from where the last one stopped and a long argument is scanned once.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

INCOMPLETE = -1  # the value has not ended yet
BROKEN = -2  # a closing bracket does not match its opener: not a value

_CLOSERS = {"{": "}", "[": "]", "(": ")"}


def holdback(text: str, marker: str) -> int:
    """The index from which `text`'s tail could be the start of `marker`, else len(text).

    `holdback("Sure <tool", "<tool_call>") == 5`: those 5 chars are safe to emit, the rest
    must wait for more text.
    """
    for k in range(max(0, len(text) - len(marker) + 1), len(text)):
        if marker.startswith(text[k:]):
            return k
    return len(text)


def holdback_any(text: str, markers: tuple[str, ...]) -> int:
    """`holdback` for several markers: the earliest index any of them could start at."""
    return min(holdback(text, m) for m in markers)


class BracketSpan:
    """Finds the end of the bracketed value that starts at `text[0]` (`{`, `[` or `(`), skipping
    brackets inside strings. JSON (`"` strings) by default; `python=True` also knows `'` strings
    and triple quotes. Only brackets and strings are checked; the caller decodes the span."""

    def __init__(self, python: bool = False) -> None:
        self._python = python
        self._pos = 0
        self._stack: list[str] = []
        self._quote = ""  # the open string's delimiter, "" outside strings

    def scan(self, text: str) -> int:
        """The end (exclusive) of the value, INCOMPLETE, or BROKEN."""
        if text and text[0] not in _CLOSERS:
            return BROKEN
        while self._pos < len(text):
            step = self._string(text) if self._quote else self._bracket(text)
            if step is not None:
                return step
        return INCOMPLETE

    def _bracket(self, text: str) -> int | None:
        ch = text[self._pos]
        if ch in _CLOSERS:
            self._stack.append(_CLOSERS[ch])
        elif ch in ")]}":
            if not self._stack or self._stack.pop() != ch:
                return BROKEN
            if not self._stack:
                self._pos += 1
                return self._pos
        elif ch == '"' or (self._python and ch == "'"):
            if self._python:
                # one, two or three quotes: decide once two more chars are here (a list that
                # closes always has them: at least the closing quote and `]`)
                if self._pos + 2 >= len(text):
                    return INCOMPLETE
                if text[self._pos + 1] == ch == text[self._pos + 2]:
                    self._quote = ch * 3
                    self._pos += 3
                    return None
            self._quote = ch
        self._pos += 1
        return None

    def _string(self, text: str) -> int | None:
        ch = text[self._pos]
        if ch == "\\":
            if self._pos + 1 >= len(text):
                return INCOMPLETE
            self._pos += 2
            return None
        if text.startswith(self._quote, self._pos):
            self._pos += len(self._quote)
            self._quote = ""
            return None
        if self._quote in ("'''", '"""') and self._quote.startswith(text[self._pos :]):
            return INCOMPLETE  # maybe the closing triple quote, cut short
        self._pos += 1
        return None


def json_string_end(text: str, start: int) -> int | None:
    """The end (exclusive) of the JSON string whose `"` is at `text[start]`, or None if cut short."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def call_from_json(obj: Any) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) of `{"name": ..., "arguments"|"parameters": {...}}`, else None.

    Arguments may also come as a JSON object encoded in a string, or be missing (no arguments).
    """
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = loads_or_none(args)
    return (name, args) if isinstance(args, dict) else None


def calls_from_json(value: Any) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls in one call object or a non-empty list of them, else None."""
    items = value if isinstance(value, list) else [value]
    calls = [call_from_json(v) for v in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def loads_or_none(text: str) -> Any:
    """`json.loads`, or None for text that is not strict JSON (NaN and Infinity are refused)."""
    try:
        return json.loads(text, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def leading_name(text: str) -> str | None:
    """The name of a call object while it streams, as soon as it is certain.

    For `text` starting `{"name": "get_weather", ` (any whitespace) returns "get_weather"; None
    while `text` could still become such a start; "" once it cannot (another key first, a
    non-string name, no comma after it).
    """
    i = 1
    for token in ('"name"', ":"):
        i = _skip_ws(text, i)
        chunk = text[i : i + len(token)]
        if not token.startswith(chunk):
            return ""
        if len(chunk) < len(token):
            return None
        i += len(token)
    i = _skip_ws(text, i)
    if i == len(text):
        return None
    if text[i] != '"':
        return ""
    end = json_string_end(text, i)
    if end is None:
        return None
    name = loads_or_none(text[i:end])
    i = _skip_ws(text, end)
    if i == len(text):
        return None
    return name if text[i] == "," and isinstance(name, str) else ""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def dumps(args: dict[str, Any]) -> str:
    """Arguments as OpenAI sends them: compact-ish JSON text, non-ASCII kept as is."""
    return json.dumps(args, ensure_ascii=False)


# Python call lists ([f(a=1), g()]) ----------------------------------------------------------

_NAME_LITERALS = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}


class NotLiteral(ValueError):
    """A pythonic call used something other than a literal (a variable, an expression, ...)."""


def python_calls(source: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls of a Python list of calls with literal keyword arguments, else None.

    `python_calls('[f(a=1, b="x"), g()]') == [("f", {"a": 1, "b": "x"}), ("g", {})]`. Parsed with
    `ast`; nothing is evaluated.
    """
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not (isinstance(node, ast.Call) and not node.args) or node.func is None:
            return None
        name = _dotted_name(node.func)
        if name is None or any(kw.arg is None for kw in node.keywords):
            return None
        try:
            args = {str(kw.arg): literal(kw.value) for kw in node.keywords}
        except (NotLiteral, RecursionError):
            return None
        calls.append((name, args))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def literal(node: ast.expr) -> Any:
    """The JSON value of a literal: str, finite number, bool, None (also JSON's true/false/null),
    list or tuple (→ list), dict with string keys, and negative numbers. Raises NotLiteral."""
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and math.isfinite(v):
            return v
        raise NotLiteral(repr(v))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = literal(node.operand)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise NotLiteral("sign on a non-number")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name) and node.id in _NAME_LITERALS:
        return _NAME_LITERALS[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values, strict=True):
            key = literal(k) if k is not None else None
            if not isinstance(key, str):
                raise NotLiteral("dict key")
            out[key] = literal(v)
        return out
    raise NotLiteral(type(node).__name__)
