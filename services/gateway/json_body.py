"""Decoding a request body into a JSON object, refusing what the services downstream cannot take.

Python's `json` accepts more than RFC 8259 and more than protobuf and UTF-8 can carry: `NaN` and
`Infinity`, numbers that overflow to infinity, duplicate keys (the last silently wins), lone UTF-16
surrogates (`"\\ud800"`, which no UTF-8 encoder takes), and nesting deep enough to raise
RecursionError. Each is a 400 here, found without recursion and before the body is validated.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from itertools import accumulate
from typing import Any

from services.gateway.errors import InvalidRequest

MAX_DEPTH = 64  # arrays and objects inside each other, the body itself included
# A JSON string (its escapes included), removed before counting brackets.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \uD800 … \uDFFF
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; InvalidRequest (400) for anything else."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8: {exc}") from None
    check_depth(body)
    try:
        data = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except ValueError as exc:  # JSONDecodeError, and ours
        raise InvalidRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body):
        check_surrogates(data)
    return data


def check_depth(body: bytes) -> None:
    """Raises InvalidRequest when arrays and objects nest more than MAX_DEPTH deep."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return  # cannot be deeper than its number of openings
    brackets = _STRING.sub(b"", body).translate(None, _BRACKETS)
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH:
        raise InvalidRequest(f"the request body is nested too deeply (more than {MAX_DEPTH})")


def check_surrogates(data: Any) -> None:
    """Raises InvalidRequest naming the first field whose key or string holds a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            _refuse_surrogate(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    _refuse_surrogate(path)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _refuse_surrogate(path: str) -> None:
    where = f"'{path}'" if path else "the request body"
    raise InvalidRequest(
        f"invalid {where}: a lone UTF-16 surrogate is not valid Unicode", param=path or None
    )


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        dup = next(key for key, count in counts.items() if count > 1)
        raise ValueError(f"duplicate key {dup[:100]!r}")
    return obj
