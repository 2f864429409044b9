"""Tool calling end to end with the real default model: forced calls (`tool_choice` "required"
or a named function) are always valid calls, as the `openai` SDK and LangChain read them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow


def tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}  # fmt: skip


CITY = {"type": "string", "maxLength": 30}
WEATHER = tool("get_weather", "Current weather of a city", {"city": CITY, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city", "unit"])  # fmt: skip
TIME = tool("get_time", "Local time in a timezone", {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}}, ["timezone"])  # fmt: skip
SEARCH = tool("search", "Search the web", {"query": {"type": "string", "maxLength": 60}, "limit": {"type": "integer", "minimum": 1, "maximum": 10}}, ["query", "limit"])  # fmt: skip
EMAIL = tool("send_email", "Send an email", {"to": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"}, "subject": {"type": "string", "maxLength": 40}}, ["to", "subject"])  # fmt: skip
CALC = tool("calculate", "Evaluate arithmetic", {"a": {"type": "number"}, "b": {"type": "number"}, "op": {"enum": ["+", "-", "*", "/"]}}, ["a", "b", "op"])  # fmt: skip
TOOLS = [WEATHER, TIME, SEARCH, EMAIL, CALC]
PROMPTS = [
    "What's the weather in Paris?",
    "What time is it in Tokyo?",
    "Find recent news about electric cars.",
    "Email bob@example.com that the meeting moved.",
    "What is 12 times 7?",
    "Is it raining in London right now?",
    "Search for a pasta recipe.",
    "What is 100 divided by 4?",
    "Tell Alice at alice@mail.com hello.",
    "Current time in New York, please.",
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def validate(call: Any, allowed: set[str]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in allowed
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_give_valid_calls_twenty_of_twenty(
    client: openai.OpenAI, model: str, stream: bool
) -> None:
    cases = [(p, "required") for p in PROMPTS] + [
        (p, {"type": "function", "function": {"name": TOOLS[i % 5]["function"]["name"]}})
        for i, p in enumerate(PROMPTS)
    ]

    def run(case: tuple[str, Any]):
        prompt, choice = case
        # One call per answer: allowed several, the 135M model goes on adding calls to max_tokens.
        kw = {"model": model, "messages": [{"role": "user", "content": prompt}], "tools": TOOLS,
              "tool_choice": choice, "parallel_tool_calls": False, "temperature": 0,
              "max_tokens": 200}  # fmt: skip
        if not stream:
            c = client.chat.completions.create(**kw).choices[0]
            return c.finish_reason, c.message.tool_calls, c.message.content
        with client.chat.completions.stream(**kw) as s:
            final = s.get_final_completion().choices[0]
        return final.finish_reason, final.message.tool_calls, final.message.content

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, cases))
    for (_, choice), (reason, calls, content) in zip(cases, results, strict=True):
        assert reason == "tool_calls" and calls, (choice, content)
        allowed = set(SCHEMAS) if choice == "required" else {choice["function"]["name"]}
        for call in calls:
            validate(call, allowed)
        assert not content


def test_a_named_call_cut_short_is_the_same_call_streamed_or_not(
    client: openai.OpenAI, model: str
) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}],
          "tools": TOOLS, "tool_choice": named, "temperature": 0, "max_tokens": 5}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "length" and not whole.message.content
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert deltas[-1].finish_reason == "length"
    assert not "".join(d.delta.content or "" for d in deltas)
    pieces = [t for d in deltas for t in d.delta.tool_calls or []]
    assert {t.index for t in pieces} == {0} and pieces[0].function.name == "get_weather"
    assert "".join(t.function.arguments or "" for t in pieces) == call.function.arguments


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Paris and in Rome?"}],
        tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.8, seed=2,
        n=2, max_tokens=200,
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1


def test_agent_round_trip(client: openai.OpenAI, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="required", temperature=0,
        max_tokens=200,
    ).choices[0]  # fmt: skip
    call = first.message.tool_calls[0]
    messages.append(first.message)
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21, "sky": "clear"}'}
    )
    final = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0,
        max_tokens=60,
    ).choices[0]  # fmt: skip
    assert final.message.content and not final.message.tool_calls
    assert final.finish_reason in ("stop", "length")


def test_legacy_functions_map_onto_tools(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        functions=[TIME["function"]], function_call={"name": "get_time"}, temperature=0,
        max_tokens=100,
    ).choices[0]  # fmt: skip
    assert reply.finish_reason == "tool_calls"
    validate(reply.message.tool_calls[0], {"get_time"})


class Weather(BaseModel):
    """Weather of a city."""

    city: str = Field(max_length=30)
    celsius: int = Field(ge=-50, le=50)


def test_langchain_bind_tools_and_function_calling_structured_output(
    server: str, model: str
) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server}/v1", api_key="none", model=model, temperature=0, max_tokens=200
    )
    msg = llm.bind_tools([t["function"] for t in TOOLS], tool_choice="any").invoke(
        "Weather in Oslo?"
    )
    assert msg.tool_calls and msg.tool_calls[0]["name"] in SCHEMAS
    jsonschema.validate(msg.tool_calls[0]["args"], SCHEMAS[msg.tool_calls[0]["name"]])
    weather = llm.with_structured_output(Weather, method="function_calling").invoke(
        "Oslo is at 4 degrees."
    )
    assert isinstance(weather, Weather)
