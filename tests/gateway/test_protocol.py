"""Request validation (400 with `param`) and the sampling the scheduler gets."""

from __future__ import annotations

import json

import pytest

from services.gateway.errors import ContextLengthExceeded, InvalidRequest
from services.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    param_name,
    parse_body,
)
from services.gateway.sampling import (
    ModelInfo,
    SamplingParams,
    chat_sampling,
    completion_sampling,
    fit_context,
    native_sampling,
)

MODEL = ModelInfo("m", context_length=2048, vocab_size=1000, max_top_logprobs=20, num_kv_slots=4096)
HI = [{"role": "user", "content": "hi"}]


def chat(**fields) -> bytes:
    return json.dumps({"messages": HI, **fields}).encode()


TEXT_PART = {"type": "text", "text": "a"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "x"}}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b"{}", "messages", "'messages' is a required property"),
        (json.dumps({"messages": []}).encode(), "messages", "at least 1 item"),
        (json.dumps({"messages": [{"role": ""}]}).encode(), "messages[0].role", "at least 1"),
        (json.dumps({"messages": [{"role": 7}]}).encode(), "messages[0].role", "valid string"),
        (
            json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(),
            "messages[0].content",
            "valid string",
        ),
        (
            chat(messages=[{"role": "user", "content": [TEXT_PART, IMAGE_PART]}]),
            "messages[0].content[1].type",
            "'image_url' is not supported (only 'text')",
        ),
        (chat(temperature=2.5), "temperature", "less than or equal to 2"),
        (chat(top_p=0), "top_p", "greater than 0"),
        (chat(n=0), "n", "greater than or equal to 1"),
        (chat(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (chat(presence_penalty=3), "presence_penalty", "less than or equal to 2"),
        (chat(stop=[""]), "stop[0]", "at least 1 character"),
        (chat(logit_bias={"abc": 1}), "logit_bias", "keys must be token ids"),
        (chat(logit_bias={"5": 101}), "logit_bias.5", "less than or equal to 100"),
        (chat(top_logprobs=21, logprobs=True), "top_logprobs", "less than or equal to 20"),
        (chat(stream="maybe"), "stream", "valid boolean"),
    ],
)
def test_chat_validation(body: bytes, param: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_body(ChatCompletionRequest, body)
    assert err.value.status == 400 and err.value.type == "invalid_request_error"
    assert err.value.param == param and message in err.value.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt[1]"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ],
)
def test_completion_validation(fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_body(CompletionRequest, json.dumps(fields).encode())
    assert err.value.param == param


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [("a", ["a"]), ([1, 2], [[1, 2]]), (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_completion_prompt_forms(prompt: object, prompts: list) -> None:
    assert (
        parse_body(CompletionRequest, json.dumps({"prompt": prompt}).encode()).prompts() == prompts
    )


def test_param_name_drops_union_branch_tags() -> None:
    assert param_name(("messages", 0, "content", "str")) == "messages[0].content"
    assert param_name(("stop", "list[constrained-str]", 0)) == "stop[0]"


def test_chat_defaults_are_openai_defaults() -> None:
    req = parse_body(ChatCompletionRequest, chat())
    assert chat_sampling(req, MODEL) == SamplingParams()


def test_chat_fields_and_extensions_reach_the_sampling() -> None:
    req = parse_body(
        ChatCompletionRequest,
        chat(
            temperature=0.5,
            top_p=0.9,
            seed=-1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logit_bias={"7": -100},
            logprobs=True,
            top_logprobs=3,
            max_completion_tokens=9,
            max_tokens=99,
            top_k=40,
            min_p=0.1,
            repetition_penalty=1.2,
            min_tokens=2,
            stop_token_ids=[5],
            ignore_eos=True,
            n=3,
        ),
    )
    s = chat_sampling(req, MODEL)
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.5, 0.9, 40, 0.1)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.2)
    assert s.seed == 2**64 - 1 and s.logit_bias == {7: -100.0}
    assert (s.logprobs, s.top_logprobs, s.max_tokens, s.min_tokens) == (True, 3, 9, 2)
    assert (s.stop_token_ids, s.ignore_eos, s.n) == ((5,), True, 3)


def test_completion_defaults_to_16_tokens_and_logprobs_int() -> None:
    req = parse_body(CompletionRequest, b'{"prompt": "x", "logprobs": 0}')
    s = completion_sampling(req, MODEL)
    assert (s.max_tokens, s.logprobs, s.top_logprobs) == (16, True, 0)


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (ChatCompletionRequest, chat(top_logprobs=2), "top_logprobs"),
        (ChatCompletionRequest, chat(stream_options={"include_usage": True}), "stream_options"),
        (ChatCompletionRequest, chat(logit_bias={"1000": 1}), "logit_bias"),
        (ChatCompletionRequest, chat(stop_token_ids=[1000]), "stop_token_ids"),
        (ChatCompletionRequest, chat(min_tokens=5, max_tokens=4), "min_tokens"),
        (CompletionRequest, b'{"prompt": "x", "echo": true, "logprobs": 1, "n": 2}', "n"),
        (CompletionRequest, b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ],
)
def test_checks_needing_the_model(model: type, body: bytes, param: str) -> None:
    req = parse_body(model, body)
    build = chat_sampling if model is ChatCompletionRequest else completion_sampling
    with pytest.raises(InvalidRequest) as err:
        build(req, MODEL)
    assert err.value.param == param


def test_top_logprobs_above_the_model_limit() -> None:
    small = ModelInfo("m", 2048, 1000, max_top_logprobs=2, num_kv_slots=4096)
    req = parse_body(ChatCompletionRequest, chat(logprobs=True, top_logprobs=3))
    with pytest.raises(InvalidRequest, match="at most 2"):
        chat_sampling(req, small)


def test_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    assert fit_context(SamplingParams(), 48, MODEL, "messages").max_tokens == 2000


def test_context_overflow_names_both_numbers() -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        fit_context(SamplingParams(max_tokens=2000), 100, MODEL, "messages")
    e = err.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "messages")
    assert all(str(x) in e.message for x in (2048, 2100, 100, 2000))
    with pytest.raises(ContextLengthExceeded, match="resulted in 2048 tokens"):
        fit_context(SamplingParams(), 2048, MODEL, "prompt")


def test_native_sampling_uses_sglang_names() -> None:
    body = (
        b'{"text": "x", "sampling_params": {"max_new_tokens": 4, "top_k": -1, "sampling_seed": 3}}'
    )
    req = parse_body(GenerateRequest, body)
    s = native_sampling(req.sampling_params, MODEL)
    assert (s.max_tokens, s.top_k, s.seed, s.temperature) == (4, 0, 3, 1.0)
