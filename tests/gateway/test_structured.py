"""Which grammar the structured-output fields of a request ask for, and the 400s for misuse."""

from __future__ import annotations

import json

import pytest

from services.common.grammar import GrammarSpec, check_grammar
from services.gateway.convert import sampling_to_pb
from services.gateway.errors import InvalidRequest
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    parse_body,
)
from services.gateway.sampling import ModelInfo, chat_sampling, fit_context, native_sampling
from services.gateway.structured import native_grammar, request_grammar

MODEL = ModelInfo("m", context_length=2048, vocab_size=1000, max_top_logprobs=20, num_kv_slots=4096)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    body = json.dumps({"messages": MESSAGES, **fields}).encode()
    return parse_body(ChatCompletionRequest, body)


@pytest.mark.parametrize(
    ("fields", "expected", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            GrammarSpec.json_schema(SCHEMA),
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}},
            GrammarSpec("json_object"),
            "response_format",
        ),
        (
            {"structured_outputs": {"json": SCHEMA}},
            GrammarSpec.json_schema(SCHEMA),
            "structured_outputs.json",
        ),
        (
            {"structured_outputs": {"regex": "[ab]+"}},
            GrammarSpec("regex", "[ab]+"),
            "structured_outputs.regex",
        ),
        (
            {"structured_outputs": {"choice": ["x", "y"]}},
            GrammarSpec.choice(["x", "y"]),
            "structured_outputs.choice",
        ),
        (
            {"structured_outputs": {"grammar": 'root ::= "a"'}},
            GrammarSpec("ebnf", 'root ::= "a"'),
            "structured_outputs.grammar",
        ),
        (
            {"structured_outputs": {"json_object": True}},
            GrammarSpec("json_object"),
            "structured_outputs.json_object",
        ),
        ({"guided_json": SCHEMA}, GrammarSpec.json_schema(SCHEMA), "guided_json"),
        (
            {"guided_json": json.dumps(SCHEMA)},
            GrammarSpec("json_schema", json.dumps(SCHEMA)),
            "guided_json",
        ),
        ({"guided_regex": r"\d+"}, GrammarSpec("regex", r"\d+"), "guided_regex"),
        ({"guided_choice": ["a", "b"]}, GrammarSpec.choice(["a", "b"]), "guided_choice"),
        ({"guided_grammar": 'root ::= "a"'}, GrammarSpec("ebnf", 'root ::= "a"'), "guided_grammar"),
        # SGLang's names on its OpenAI routes.
        (
            {"json_schema": json.dumps(SCHEMA)},
            GrammarSpec("json_schema", json.dumps(SCHEMA)),
            "json_schema",
        ),
        ({"json_schema": SCHEMA}, GrammarSpec.json_schema(SCHEMA), "json_schema"),
        ({"regex": r"\d+"}, GrammarSpec("regex", r"\d+"), "regex"),
        ({"ebnf": 'root ::= "a"'}, GrammarSpec("ebnf", 'root ::= "a"'), "ebnf"),
    ],
)
def test_each_field_maps_to_its_grammar(fields: dict, expected: GrammarSpec, param: str) -> None:
    req = chat(**fields)
    assert request_grammar(req) == (expected, param)
    params = chat_sampling(req, MODEL)
    assert (params.grammar, params.grammar_param) == (expected, param)
    msg = sampling_to_pb(fit_context(params, 10, MODEL, "messages"))
    assert GrammarSpec.from_pb(msg.grammar) == expected
    check_grammar(expected)  # every mapping gives a grammar xgrammar parses


def test_text_format_and_no_field_mean_free_text() -> None:
    assert request_grammar(chat()) is None
    assert request_grammar(chat(response_format={"type": "text"})) is None
    assert not sampling_to_pb(fit_context(chat_sampling(chat(), MODEL), 5, MODEL, "m")).HasField(
        "grammar"
    )


@pytest.mark.parametrize(("name", "kind"), [("guided_regex", "regex"), ("regex", "regex")])
def test_completions_take_the_same_fields(name: str, kind: str) -> None:
    body = json.dumps({"prompt": "x", name: "[0-9]"}).encode()
    assert request_grammar(parse_body(CompletionRequest, body)) == (
        GrammarSpec(kind, "[0-9]"),
        name,
    )


def test_choice_literals_are_escaped_so_each_option_is_exactly_one_sentence() -> None:
    import xgrammar as xgr

    options = ['say "hi"', "back\\slash", "new\nline", "ünï"]
    grammar = xgr.Grammar.from_ebnf(GrammarSpec.choice(options).spec)
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)], xgr.VocabType.RAW)
    compiled = xgr.GrammarCompiler(info).compile_grammar(grammar)
    for option in options:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert matcher.accept_string(option) and matcher.is_completed(), option
    matcher = xgr.GrammarMatcher(compiled)
    assert not matcher.accept_string("say hi")


def test_two_constraints_are_a_400_naming_the_second() -> None:
    with pytest.raises(InvalidRequest) as err:
        request_grammar(chat(response_format={"type": "json_object"}, guided_regex="a"))
    assert err.value.param == "guided_regex"
    with pytest.raises(InvalidRequest) as err:
        request_grammar(chat(structured_outputs={"regex": "a", "choice": ["b"]}))
    assert err.value.param == "structured_outputs.choice"
    with pytest.raises(InvalidRequest) as err:
        request_grammar(chat(guided_regex="a", ebnf='root ::= "a"'))
    assert err.value.param == "ebnf"


def test_misshapen_fields_are_400s_naming_them() -> None:
    with pytest.raises(InvalidRequest) as err:
        request_grammar(chat(response_format={"type": "json_schema"}))
    assert err.value.param == "response_format.json_schema"
    with pytest.raises(InvalidRequest) as err:
        chat(response_format={"type": "xml"})
    assert err.value.param == "response_format.type"
    with pytest.raises(InvalidRequest) as err:
        chat(structured_outputs={"whitespace_pattern": " "})
    assert err.value.param == "structured_outputs.whitespace_pattern"
    with pytest.raises(InvalidRequest) as err:
        chat(guided_choice=[])
    assert err.value.param == "guided_choice"


def test_generate_takes_sglang_fields() -> None:
    body = {"text": "x", "sampling_params": {"json_schema": json.dumps(SCHEMA)}}
    req = parse_body(GenerateRequest, json.dumps(body).encode())
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    assert native_grammar(req.sampling_params) == (spec, "sampling_params.json_schema")
    assert native_sampling(req.sampling_params, MODEL).grammar == spec
    body = {"text": "x", "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}
    req = parse_body(GenerateRequest, json.dumps(body).encode())
    with pytest.raises(InvalidRequest) as err:
        native_grammar(req.sampling_params)
    assert err.value.param == "sampling_params.ebnf"
