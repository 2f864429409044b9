"""Grammars that constrain a request's output, as every service sees them, and their xgrammar form.

A `GrammarSpec` is a kind and a text (a JSON Schema, a regex, an EBNF grammar, an xgrammar
structural tag). The gateway builds it from the request fields (`response_format`, vLLM's
`structured_outputs` / `guided_*`, SGLang's `regex` / `ebnf` / `json_schema`); the executor
compiles it against the model's vocabulary (`compile_grammar`) with xgrammar, which does the
matching and the token masks, and its errors are the request's 400. `check_grammar` makes the
same checks without a tokenizer.

JSON is generated compactly: `any_whitespace=False` lets the model emit no free whitespace
between tokens of the JSON syntax, so a small model cannot loop on blank space; schemas are
compiled in xgrammar's strict mode (properties a schema does not list are not generated unless
it sets `additionalProperties`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from radixserve.v1 import grammar_pb2 as gpb

if TYPE_CHECKING:
    import xgrammar

KINDS = ("json_schema", "json_object", "regex", "ebnf", "structural_tag")
_KIND_TO_PB = {
    "json_schema": gpb.Grammar.JSON_SCHEMA,
    "json_object": gpb.Grammar.JSON_OBJECT,
    "regex": gpb.Grammar.REGEX,
    "ebnf": gpb.Grammar.EBNF,
    "structural_tag": gpb.Grammar.STRUCTURAL_TAG,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
# JSON object with any members: what OpenAI's `json_object` response format promises.
ANY_OBJECT_SCHEMA = '{"type": "object", "additionalProperties": true}'
# xgrammar prefixes its messages with "[time] file.cc:line: "; users need only the reason.
_LOCATION = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A grammar that cannot be parsed or compiled; the message says why (for a 400)."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. `kind` is one of KINDS; `spec` its text ("" for
    json_object). Hashable: it is the key of the compiled-grammar caches."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}")

    def to_pb(self) -> gpb.Grammar:
        return gpb.Grammar(kind=_KIND_TO_PB[self.kind], spec=self.spec)

    @classmethod
    def from_pb(cls, msg: gpb.Grammar) -> GrammarSpec | None:
        """None for an unset (KIND_UNSPECIFIED) grammar; GrammarError for an unknown kind."""
        if msg.kind == gpb.Grammar.KIND_UNSPECIFIED:
            return None
        if msg.kind not in _PB_TO_KIND:
            raise GrammarError(f"unknown grammar kind {msg.kind}")
        return cls(_PB_TO_KIND[msg.kind], msg.spec)

    @classmethod
    def json_schema(cls, schema: Any) -> GrammarSpec:
        """From a schema as a JSON string or as decoded JSON (a dict, or true for any value)."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        """Exactly one of `options`, as an EBNF alternation of string literals."""
        if not options:
            raise GrammarError("a choice needs at least one option")
        return cls("ebnf", "root ::= " + " | ".join(_ebnf_literal(o) for o in options))


def _ebnf_literal(text: str) -> str:
    """A double-quoted EBNF literal; xgrammar reads JSON's escapes in them."""
    return json.dumps(text, ensure_ascii=False)


def check_grammar(spec: GrammarSpec) -> None:
    """Parses `spec` without a tokenizer; raises GrammarError with the reason if it is invalid.
    Takes about a millisecond for ordinary schemas; the same checks `compile_grammar` makes."""
    import xgrammar as xgr

    def build() -> Any:
        name, _, args, kwargs = _xgrammar_call(spec)
        return getattr(xgr.Grammar, name)(*args, **kwargs)

    _guarded(build)


def compile_grammar(compiler: xgrammar.GrammarCompiler, spec: GrammarSpec) -> Any:
    """The xgrammar CompiledGrammar of `spec` against the compiler's vocabulary (the compiler
    caches by grammar text). Raises GrammarError with the reason if `spec` is invalid."""

    def build() -> Any:
        _, method, args, kwargs = _xgrammar_call(spec)
        return getattr(compiler, method)(*args, **kwargs)

    return _guarded(build)


def _xgrammar_call(spec: GrammarSpec) -> tuple[str, str, tuple[str], dict[str, Any]]:
    """(the `xgrammar.Grammar.from_*` builder, the `GrammarCompiler.compile_*` method, their
    arguments) for `spec`: one place for the options of each kind."""
    if spec.kind == "json_schema":
        json.loads(spec.spec)  # a clearer message than the converter's for broken JSON
        strict = {"any_whitespace": False, "strict_mode": True}
        return "from_json_schema", "compile_json_schema", (spec.spec,), strict
    if spec.kind == "json_object":
        compact = {"any_whitespace": False}
        return "from_json_schema", "compile_json_schema", (ANY_OBJECT_SCHEMA,), compact
    if spec.kind == "regex":
        return "from_regex", "compile_regex", (spec.spec,), {}
    if spec.kind == "ebnf":
        return "from_ebnf", "compile_grammar", (spec.spec,), {}
    return "from_structural_tag", "compile_structural_tag", (spec.spec,), {}


def _guarded(fn: Any) -> Any:
    try:
        return fn()
    except json.JSONDecodeError as exc:
        raise GrammarError(f"the schema is not valid JSON: {exc}") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(_reason(exc)) from None


def _reason(exc: Exception) -> str:
    lines = [_LOCATION.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(exc).__name__
