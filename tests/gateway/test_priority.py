"""`priority` (vLLM's extension field) reaches the scheduler request; bad values are 400s."""

from __future__ import annotations

import json

import pytest

from services.gateway.convert import generate_request_to_pb
from services.gateway.errors import InvalidRequest
from services.gateway.protocol import ChatCompletionRequest, GenerateRequest, parse_body
from services.gateway.sampling import (
    GenerationInput,
    ModelInfo,
    TextOptions,
    chat_sampling,
    fit_context,
)

MODEL = ModelInfo("m", context_length=2048, vocab_size=1000, max_top_logprobs=20, num_kv_slots=4096)


def chat(**fields: object) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_body(ChatCompletionRequest, json.dumps(body).encode())


def test_priority_travels_to_the_scheduler_request() -> None:
    sampling = fit_context(chat_sampling(chat(priority=-5), MODEL), 3, MODEL, "messages")
    msg = generate_request_to_pb(GenerationInput("r", [1, 2, 3], sampling, TextOptions()))
    assert msg.priority == -5
    native = parse_body(GenerateRequest, json.dumps({"text": "x", "priority": 2}).encode())
    assert native.priority == 2


@pytest.mark.parametrize("value", ["1", 1.5, True, 2**31, -(2**31) - 1])
def test_bad_priorities_are_400s_naming_it(value: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        chat(priority=value)
    assert err.value.param == "priority"
