"""The grammar a request's fields ask for: OpenAI's, vLLM's and SGLang's structured-output fields.

Accepted, at most one per request (a second one is a 400 naming it):

- OpenAI `response_format`: `{"type": "text"}` (no constraint), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, and vLLM / SGLang's
  `{"type": "structural_tag", "format": ...}` (an xgrammar structural tag).
- vLLM `structured_outputs`: one of `json` (a schema), `regex`, `choice`, `grammar` (EBNF),
  `json_object`, `structural_tag`; and the older `guided_json`, `guided_regex`, `guided_choice`,
  `guided_grammar`.
- SGLang's top-level `json_schema` (a schema, as a string or an object), `regex` and `ebnf` on
  chat and completions.
- SGLang `/generate` sampling params: `json_schema` (a schema as a string), `regex`, `ebnf`,
  `structural_tag`.

The grammar is compiled by the executor; one that does not compile comes back as a 400 whose
`param` is the field it came from (`Generation` attaches it).
"""

from __future__ import annotations

import json
from typing import Any

from services.common.grammar import GrammarError, GrammarSpec
from services.gateway.errors import InvalidRequest
from services.gateway.protocol import NativeSamplingParams, ResponseFormat, SamplingFields


def request_grammar(req: SamplingFields) -> tuple[GrammarSpec, str] | None:
    """(grammar, the field it came from) of a chat or completions request, or None."""
    found: list[tuple[GrammarSpec, str]] = []
    if req.response_format is not None:
        spec = _response_format(req.response_format)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs.model_dump(by_alias=True))
    # (field, its vLLM-style kind, value): vLLM's older names, then SGLang's.
    flat: list[tuple[str, str, Any]] = [
        ("guided_json", "json", req.guided_json),
        ("guided_regex", "regex", req.guided_regex),
        ("guided_choice", "choice", req.guided_choice),
        ("guided_grammar", "grammar", req.guided_grammar),
        ("json_schema", "json", req.json_schema),
        ("regex", "regex", req.regex),
        ("ebnf", "grammar", req.ebnf),
    ]
    for name, kind, value in flat:
        if value is not None:
            found.append((_spec(kind, value, name), name))
    return _at_most_one(found)


def native_grammar(p: NativeSamplingParams) -> tuple[GrammarSpec, str] | None:
    """(grammar, field) of /generate's sampling params, or None."""
    found = []
    for name, kind in (
        ("json_schema", "json_schema"),
        ("regex", "regex"),
        ("ebnf", "ebnf"),
        ("structural_tag", "structural_tag"),
    ):
        value = getattr(p, name)
        if value is not None:
            found.append((GrammarSpec(kind, value), f"sampling_params.{name}"))
    return _at_most_one(found)


def _response_format(fmt: ResponseFormat) -> GrammarSpec | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt.type == "structural_tag":
        return GrammarSpec("structural_tag", json.dumps(fmt.model_dump(exclude_none=True)))
    if fmt.json_schema is None:
        raise InvalidRequest(
            "'response_format.json_schema' is required when type is 'json_schema'",
            param="response_format.json_schema",
        )
    schema = fmt.json_schema.schema_
    if schema is None:
        return GrammarSpec("json_object")
    return GrammarSpec.json_schema(schema)


def _structured_outputs(fields: dict[str, Any]) -> list[tuple[GrammarSpec, str]]:
    found = []
    for name, value in fields.items():
        if value is None or (name == "json_object" and value is False):
            continue
        param = f"structured_outputs.{name}"
        found.append((_spec(name, value, param), param))
    return found


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    """A vLLM-style constraint: json (schema), regex, choice, grammar, json_object, structural_tag."""
    try:
        if kind == "json":
            return GrammarSpec.json_schema(value)
        if kind == "choice":
            return GrammarSpec.choice(list(value))
        if kind == "grammar":
            return GrammarSpec("ebnf", value)
        if kind == "json_object":
            return GrammarSpec("json_object")
        if kind == "structural_tag":
            return GrammarSpec(
                "structural_tag", value if isinstance(value, str) else json.dumps(value)
            )
        return GrammarSpec("regex", value)
    except GrammarError as exc:
        raise InvalidRequest(f"invalid '{param}': {exc}", param=param) from None


def _at_most_one(found: list[tuple[GrammarSpec, str]]) -> tuple[GrammarSpec, str] | None:
    if len(found) > 1:
        first, second = found[0][1], found[1][1]
        raise InvalidRequest(
            f"'{second}' cannot be combined with '{first}': a request takes one output constraint",
            param=second,
        )
    return found[0] if found else None
