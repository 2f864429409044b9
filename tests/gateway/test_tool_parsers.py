"""Tool-call parsers: exact whole-answer results per format, and streaming at every split point
(and random ones) against the whole-answer result."""

from __future__ import annotations

import json
import keyword
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.tools.calls import ParsedOutput, ToolCallDelta, collect
from services.gateway.tools.parsers import TOOL_PARSERS, default_tool_parser

ID = re.compile(r"call_[0-9a-f]{24}")
Call = tuple[str, dict[str, Any]]

TRICKY = {"code": 'if x: {"y": "}"} </tool_call> ]', "note": "é ✓ 日本 🙂", "n": [1, {"a": None}]}

# (parser, model output, expected content, expected calls)
CASES: list[tuple[str, str, str | None, list[Call]]] = [
    # hermes
    ("hermes", "Just text, no tools.", "Just text, no tools.", []),
    ("hermes", "", None, []),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "hermes",
        "I'll check both.\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        "I'll check both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "hermes",
        "<tool_call>" + json.dumps({"name": "run", "arguments": TRICKY}) + "</tool_call>",
        None,
        [("run", TRICKY)],
    ),
    (
        "hermes",  # SmolLM2's list form, and "parameters"
        '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "parameters": {}}]</tool_call>',
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
    (
        "hermes",  # arguments encoded as a string; name after arguments; no closing tag
        '<tool_call>{"arguments": "{\\"q\\": \\"ü\\"}", "name": "search"}',
        None,
        [("search", {"q": "ü"})],
    ),
    (
        "hermes",
        'Before <tool_call>{"name": "f", "arguments": {}}</tool_call> after',
        "Beforeafter",
        [("f", {})],
    ),
    ("hermes", "a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),
    (
        "hermes",
        'x <tool_call>{"foo": 1}</tool_call>',
        'x <tool_call>{"foo": 1}</tool_call>',
        [],
    ),
    ("hermes", '<tool_call>{"nam', '<tool_call>{"nam', []),
    ("hermes", "ends with <tool", "ends with <tool", []),
    ("hermes", '<tool_call>{"name": 5]', '<tool_call>{"name": 5]', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": NaN}}', None, [("f", {})]),
    # the name was streamed before the arguments broke: the call stays, with {}
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": ', None, [("f", {})]),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"a": ]}</tool_call>then',
        "then",
        [("f", {})],
    ),
    # llama3_json
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "a", "parameters": {"x": [1, 2]}}; {"name": "b", "arguments": {}};',
        None,
        [("a", {"x": [1, 2]}), ("b", {})],
    ),
    (
        "llama3_json",
        'Let me look. <|python_tag|>{"name": "run", "parameters": ' + json.dumps(TRICKY) + "}",
        "Let me look.",
        [("run", TRICKY)],
    ),
    ("llama3_json", "Plain answer {with braces}.", "Plain answer {with braces}.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '  {"name": "f"', '  {"name": "f"', []),
    (
        "llama3_json",
        '{"name": "a", "parameters": {}} and then text',
        "and then text",
        [("a", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>brave_search.call(query="x")',
        '<|python_tag|>brave_search.call(query="x")',
        [],
    ),
    # mistral
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {}, "id": "abc123def"}]',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "run", "arguments": ' + json.dumps(TRICKY) + "}]",
        "Sure.",
        [("run", TRICKY)],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{"s": "[ARGS]}"}',
        None,
        [("f", {"s": "[ARGS]}"})],
    ),
    ("mistral", '[TOOL_CALLS]f{"a": 1}', None, [("f", {"a": 1})]),
    ("mistral", "[TOOL_CALLS]hello world", "[TOOL_CALLS]hello world", []),
    ("mistral", "[TOOL_CALLS][1, 2]", "[TOOL_CALLS][1, 2]", []),
    ("mistral", "See [TOOL_", "See [TOOL_", []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": ', None, [("f", {})]),
    # pythonic
    (
        "pythonic",
        '[get_weather(city="Paris", days=3), get_time()]',
        None,
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {})],
    ),
    (
        "pythonic",
        "<|python_start|>[f(a=-1.5, b=True, c=None, d=[1, (2, 3)], e={'k': 'v]'}, g=null)]"
        "<|python_end|>",
        None,
        [("f", {"a": -1.5, "b": True, "c": None, "d": [1, [2, 3]], "e": {"k": "v]"}, "g": None})],
    ),
    (
        "pythonic",
        "[note(text='''multi\nline \"quoted\" )]'''), x.y(z='ü')]\nDone.",
        "Done.",
        [("note", {"text": 'multi\nline "quoted" )]'}), ("x.y", {"z": "ü"})],
    ),
    ("pythonic", "[1] is a citation.", "[1] is a citation.", []),
    ("pythonic", "[f(a=os.system('ls'))]", "[f(a=os.system('ls'))]", []),
    ("pythonic", "[f(1, 2)]", "[f(1, 2)]", []),
    ("pythonic", "[f(a=1)", "[f(a=1)", []),
    ("pythonic", "Answer: [f(a=1)]", "Answer: [f(a=1)]", []),
]


def ids(case: tuple[str, str, str | None, list[Call]]) -> str:
    return f"{case[0]}:{case[1][:40]!r}"


def streamed(parser: str, pieces: list[str]) -> ParsedOutput:
    s = TOOL_PARSERS[parser]().stream()
    deltas = [d for p in pieces for d in s.feed(p)] + s.finish()
    check_delta_shapes(deltas)
    return collect(deltas)


def check_delta_shapes(deltas: list[Any]) -> None:
    """OpenAI's streamed shape: a call's first delta has id and name, later ones only arguments."""
    seen: list[int] = []
    for d in deltas:
        if isinstance(d, str):
            assert d
            continue
        assert isinstance(d, ToolCallDelta)
        if d.index not in seen:
            assert d.index == len(seen)
            assert d.id is not None and ID.fullmatch(d.id) and d.name
            seen.append(d.index)
        else:
            assert d.index == seen[-1] and d.id is None and d.name is None


def calls_of(out: ParsedOutput) -> list[Call]:
    return [(c.name, json.loads(c.arguments)) for c in out.calls]


def assert_same(got: ParsedOutput, want: ParsedOutput) -> None:
    assert got.content == want.content
    assert [(c.name, c.arguments) for c in got.calls] == [(c.name, c.arguments) for c in want.calls]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_whole_answer(case: tuple[str, str, str | None, list[Call]]) -> None:
    parser, text, content, calls = case
    out = TOOL_PARSERS[parser]().parse(text)
    assert out.content == content
    assert calls_of(out) == calls
    assert all(ID.fullmatch(c.id) for c in out.calls)
    assert len({c.id for c in out.calls}) == len(out.calls)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_every_two_piece_split_and_char_by_char(
    case: tuple[str, str, str | None, list[Call]],
) -> None:
    parser, text, _, _ = case
    whole = TOOL_PARSERS[parser]().parse(text)
    for cut in range(len(text) + 1):
        assert_same(streamed(parser, [text[:cut], text[cut:]]), whole)
    assert_same(streamed(parser, list(text)), whole)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_splits(data: st.DataObject) -> None:
    parser, text, _, _ = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert_same(streamed(parser, pieces), TOOL_PARSERS[parser]().parse(text))


# Random calls rendered in each format come back exactly, whole and streamed ------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True).filter(
    lambda n: not keyword.iskeyword(n)
)
CALLS = st.lists(
    st.tuples(NAMES, st.dictionaries(NAMES, JSON_VALUES, max_size=4)), min_size=1, max_size=3
)
# Free text before the calls: no marker characters, not starting like a call.
PREFIX = st.text(st.characters(blacklist_characters="<[{|"), max_size=20)


def render(parser: str, prefix: str, calls: list[Call]) -> str:
    if parser == "hermes":
        blocks = [json.dumps({"name": n, "arguments": a}) for n, a in calls]
        return prefix + "".join(f"<tool_call>\n{b}\n</tool_call>\n" for b in blocks)
    if parser == "llama3_json":
        objs = [json.dumps({"name": n, "parameters": a}) for n, a in calls]
        return prefix + "<|python_tag|>" + "; ".join(objs)
    if parser == "mistral":
        return prefix + "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)
    args = [", ".join(f"{k}={v!r}" for k, v in a.items()) for _, a in calls]
    return "[" + ", ".join(f"{n}({s})" for (n, _), s in zip(calls, args, strict=True)) + "]"


@settings(max_examples=200, deadline=None)
@given(parser=st.sampled_from(sorted(TOOL_PARSERS)), prefix=PREFIX, calls=CALLS, data=st.data())
def test_rendered_calls_round_trip(
    parser: str, prefix: str, calls: list[Call], data: st.DataObject
) -> None:
    if parser == "pythonic":
        prefix = ""
    text = render(parser, prefix, calls)
    whole = TOOL_PARSERS[parser]().parse(text)
    assert calls_of(whole) == calls
    assert whole.content == (prefix.rstrip() or None)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert_same(streamed(parser, pieces), whole)


# Streaming specifics --------------------------------------------------------------------------


def test_hermes_streams_the_name_before_the_arguments_are_complete() -> None:
    s = TOOL_PARSERS["hermes"]().stream()
    assert s.feed("Checking <tool") == ["Checking"]  # "<tool" and the space are held back
    assert s.feed('_call>\n{"name": "get_weather"') == []
    (head,) = s.feed(', "arguments": {"city": "Pa')
    assert isinstance(head, ToolCallDelta)
    assert (head.index, head.name, head.arguments) == (0, "get_weather", "")
    assert s.feed('ris"}}\n') == [ToolCallDelta(0, None, None, '{"city": "Paris"}')]
    assert s.feed("</tool_call>") == []
    assert s.finish() == []


def test_content_streams_without_waiting_for_the_end() -> None:
    s = TOOL_PARSERS["mistral"]().stream()
    assert s.feed("Hello wor") == ["Hello wor"]
    assert s.feed("ld [TOOL") == ["ld"]  # " [TOOL" may open a call: held back
    assert s.feed("S] and more") == [" [TOOLS] and more"]
    assert s.finish() == []


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_no_markup_reaches_content_while_streaming(parser: str) -> None:
    text = render(parser, "Hi. ", [("f", {"a": "</tool_call>"}), ("g", {})])
    if parser == "pythonic":
        text = text.removeprefix("Hi. ")
    s = TOOL_PARSERS[parser]().stream()
    content = [d for ch in text for d in s.feed(ch) if isinstance(d, str)]
    content += [d for d in s.finish() if isinstance(d, str)]
    assert "".join(content) == ("" if parser == "pythonic" else "Hi.")


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_every_parser_has_a_name_and_a_format_hint(parser: str) -> None:
    cls = TOOL_PARSERS[parser]
    assert cls.name == parser
    assert len(cls.format_hint) > 40


@pytest.mark.parametrize(
    ("architecture", "model", "expected"),
    [
        ("Qwen2ForCausalLM", "Qwen/Qwen2.5-7B-Instruct", "hermes"),
        ("Qwen3ForCausalLM", "Qwen/Qwen3-8B", "hermes"),
        ("Qwen3MoeForCausalLM", "Qwen/Qwen3-30B-A3B", "hermes"),
        ("LlamaForCausalLM", "NousResearch/Hermes-3-Llama-3.1-8B", "hermes"),
        ("LlamaForCausalLM", "HuggingFaceTB/SmolLM2-135M-Instruct", "hermes"),
        ("LlamaForCausalLM", "meta-llama/Llama-3.1-8B-Instruct", "llama3_json"),
        ("LlamaForCausalLM", "meta-llama/Llama-3.2-3B-Instruct", "llama3_json"),
        ("LlamaForCausalLM", "/models/meta-llama-3-8b", "llama3_json"),
        ("Llama4ForConditionalGeneration", "meta-llama/Llama-4-Scout-17B-16E", "pythonic"),
        ("MistralForCausalLM", "mistralai/Mistral-7B-Instruct-v0.3", "mistral"),
        ("MixtralForCausalLM", "mistralai/Mixtral-8x22B-Instruct-v0.1", "mistral"),
        ("LlamaForCausalLM", "huggyllama/llama-30b", None),
        ("LlamaForCausalLM", "meta-llama/Llama-2-7b-chat-hf", None),
        ("GPT2LMHeadModel", "gpt2", None),
    ],
)
def test_default_tool_parser(architecture: str, model: str, expected: str | None) -> None:
    assert default_tool_parser(architecture, model) == expected


# Fuzz: any text made of markup fragments parses without raising, and the same at any split ---

FRAGMENT = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<|python_tag|>",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
        "<|python_start|>",
        "<|python_end|>",
        '{"name": "f", ',
        '"arguments": ',
        '"parameters": ',
        "{}",
        "{",
        "}",
        "[",
        "]",
        "f(",
        "a=1",
        ")",
        '"',
        "'''",
        "'",
        "\\",
        ",",
        ";",
        ":",
        " ",
        "\n",
        "x",
        "<",
        "é",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    parser=st.sampled_from(sorted(TOOL_PARSERS)),
    text=st.lists(FRAGMENT, max_size=16).map("".join),
    data=st.data(),
)
def test_fuzzed_markup_is_split_invariant(parser: str, text: str, data: st.DataObject) -> None:
    whole = TOOL_PARSERS[parser]().parse(text)
    for call in whole.calls:
        assert isinstance(json.loads(call.arguments), dict)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert_same(streamed(parser, pieces), whole)
    assert_same(streamed(parser, list(text)), whole)
