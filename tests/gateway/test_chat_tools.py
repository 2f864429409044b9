"""A chat answer split into reasoning, content and tool calls, whole and streamed, per tool_choice."""

from __future__ import annotations

import json

import pytest

from services.common.grammar import check_grammar
from services.gateway.chat_tools import Answer, ToolPlan, plan_tools
from services.gateway.errors import InvalidRequest
from services.gateway.responses import _merge_delta

WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
TIME = {"name": "get_time"}


def streamed(answer: Answer, text: str, step: int) -> dict:
    """The deltas of `text` fed `step` characters at a time, merged as a client accumulates."""
    total: dict = {}
    for i in range(0, len(text), step):
        total = _merge_delta(total, answer.feed(text[i : i + step]))
    return _merge_delta(total, answer.finish())


def calls_of(fields: dict) -> list[tuple[str, dict]]:
    return [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in fields.get("tool_calls", [])
    ]


def test_plans_and_their_grammars() -> None:
    assert plan_tools([], None, None, "hermes") is None
    with pytest.raises(InvalidRequest, match="needs 'tools'"):
        plan_tools([], "required", None, "hermes")
    with pytest.raises(InvalidRequest, match="not among the tools"):
        plan_tools([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, None)
    auto = plan_tools([WEATHER, TIME], None, None, "hermes")
    assert auto is not None and (auto.mode, auto.parser, auto.grammar()) == ("auto", "hermes", None)
    required = plan_tools([WEATHER, TIME], "required", False, "hermes")
    assert required is not None and required.mode == "required" and required.parser is None
    schema = json.loads(required.grammar().spec)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = plan_tools(
        [WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, None, None
    )
    assert named is not None and json.loads(named.grammar().spec) == WEATHER["parameters"]
    for plan in (required, named):
        check_grammar(plan.grammar())


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_auto_parses_calls_out_of_the_answer(step: int) -> None:
    plan = plan_tools([WEATHER], "auto", None, "hermes")
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    whole = Answer(plan, None).message(text)
    assert whole["content"] == "Let me check." and calls_of(whole) == [
        ("get_weather", {"city": "Paris"})
    ]
    answer = Answer(plan, None)
    fields = streamed(answer, text, step)
    assert fields["content"] == "Let me check." and calls_of(fields) == calls_of(whole)
    assert answer.called and fields["tool_calls"][0]["id"].startswith("call_")


def test_parallel_false_keeps_the_first_call() -> None:
    plan = plan_tools([WEATHER, TIME], "auto", False, "hermes")
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>'
    assert calls_of(Answer(plan, None).message(text)) == [("get_time", {})]
    assert calls_of(streamed(Answer(plan, None), text, 2)) == [("get_time", {})]


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_required_and_named_answers_are_calls(step: int) -> None:
    required = plan_tools([WEATHER, TIME], "required", None, "hermes")
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    expected = [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    whole = Answer(required, None).message(text)
    assert whole["content"] is None and calls_of(whole) == expected
    assert calls_of(streamed(Answer(required, None), text, step)) == expected
    named = plan_tools(
        [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None
    )
    args = '{"city": "Rome"}'
    assert calls_of(Answer(named, None).message(args)) == [("get_weather", {"city": "Rome"})]
    assert calls_of(streamed(Answer(named, None), args, step)) == [
        ("get_weather", {"city": "Rome"})
    ]


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_forced_answer_cut_short_is_the_same_whole_and_streamed(step: int) -> None:
    """Cut short by max_tokens: a named function's call carries the arguments so far; a required
    answer keeps the calls it completed, and with none its text is content."""
    required = plan_tools([WEATHER, TIME], "required", None, None)
    none_done = '[{"name": "get_weather", "argu'
    answer = Answer(required, None)
    whole = answer.message(none_done)
    assert whole["content"] == none_done and "tool_calls" not in whole and not answer.called
    assert streamed(Answer(required, None), none_done, step) == {"content": none_done}
    one_done = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_t'
    whole = Answer(required, None).message(one_done)
    assert whole["content"] is None and calls_of(whole) == [("get_weather", {"city": "Oslo"})]
    assert calls_of(streamed(Answer(required, None), one_done, step)) == calls_of(whole)
    named = plan_tools(
        [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None
    )
    cut = '{"city": "Ro'
    for fields in (Answer(named, None).message(cut), streamed(Answer(named, None), cut, step)):
        (call,) = fields["tool_calls"]
        assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather", cut)
        assert not fields.get("content")


def test_reasoning_goes_to_its_own_fields_and_calls_are_parsed_after_it() -> None:
    plan = plan_tools([WEATHER], "auto", None, "hermes")
    text = '<think>The user wants weather.</think>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Nice"}}</tool_call>'
    whole = Answer(plan, "deepseek-r1").message(text)
    assert whole["reasoning_content"] == whole["reasoning"] == "The user wants weather."
    assert calls_of(whole) == [("get_weather", {"city": "Nice"})] and whole["content"] is None
    fields = streamed(Answer(plan, "deepseek-r1"), text, 4)
    assert fields["reasoning_content"] == "The user wants weather." and calls_of(
        fields
    ) == calls_of(whole)
    plain = Answer(None, "qwen3").message("<think>hmm</think>It is 4.")
    assert (plain["reasoning_content"], plain["content"]) == ("hmm", "It is 4.")


def test_tool_choice_none_leaves_markup_as_content() -> None:
    plan = plan_tools([WEATHER], "none", None, "hermes")
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert plan is not None and Answer(plan, None).message(text) == {"content": text}
    assert isinstance(plan, ToolPlan) and plan.grammar() is None


@pytest.mark.parametrize(
    ("parser", "accepted", "refused"),
    [
        ("deepseek-r1", ['Let me see.</think>{"city": "Oslo"}', '</think>{"city": "X"}'], ['{"city": "Oslo"}']),
        ("qwen3", ['<think>hmm</think>{"city": "Oslo"}', '{"city": "Oslo"}'], ['hmm</think>{"city": "Oslo"}']),
    ],
)  # fmt: skip
def test_a_constraint_applies_after_the_think_section(parser, accepted, refused) -> None:
    import xgrammar as xgr

    from services.common.grammar import GrammarSpec
    from services.gateway.chat_tools import after_reasoning

    spec = after_reasoning(GrammarSpec.json_schema(WEATHER["parameters"]), parser)
    assert spec.kind == "structural_tag"
    info = xgr.TokenizerInfo([bytes([i]) for i in range(256)], xgr.VocabType.RAW)
    compiled = xgr.GrammarCompiler(info).compile_grammar(xgr.Grammar.from_structural_tag(spec.spec))
    for text in accepted:
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert m.accept_string(text) and m.is_completed(), text
    for text in refused:
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert not (m.accept_string(text) and m.is_completed()), text
