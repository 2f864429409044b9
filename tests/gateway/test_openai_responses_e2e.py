"""The Responses API through the real services and model, with the `openai` SDK."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.slow


def sdk(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key)


def test_a_conversation_continues_from_the_prefix_cache(stack: Stack) -> None:
    client = sdk(stack)
    first = client.responses.create(
        model=stack.model,
        instructions="You are a terse assistant.",
        input="Name three colours of the rainbow, please, and nothing else.",
        max_output_tokens=12,
        temperature=0,
    )
    assert first.status in ("completed", "incomplete") and first.output_text
    second = client.responses.create(
        model=stack.model,
        input="Now name one more.",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    assert second.output_text and second.previous_response_id == first.id
    assert second.usage is not None and first.usage is not None
    # The first turn (input and answer) is part of the second prompt, read from the cache.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_streamed_events_add_up_to_the_response(stack: Stack) -> None:
    events = list(
        sdk(stack).responses.create(
            model=stack.model,
            input="Write a long story about a dragon.",
            max_output_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    final = events[-1]
    assert final.type == "response.incomplete"  # 4 tokens are not enough to finish
    assert final.response.incomplete_details.reason == "max_output_tokens"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.response.output_text and final.response.usage.output_tokens == 4


def test_a_named_function_call_round_trips(stack: Stack) -> None:
    """tool_choice names the function: the answer is constrained to a valid call of it."""
    client = sdk(stack)
    weather = {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    first = client.responses.create(
        model=stack.model,
        input="What is the weather in Paris?",
        tools=[weather],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=48,
        temperature=0,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    second = client.responses.create(
        model=stack.model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[weather],
        tool_choice="none",
        max_output_tokens=16,
        temperature=0,
    )
    assert second.output_text and second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn is cached
