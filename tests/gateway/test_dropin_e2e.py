"""vLLM's and SGLang's conventions and extensions through the real services and model.

Streams are read with the `openai` client and as raw server-sent events. Each chunk carries the
tokens of one scheduler step (one token while the client keeps up; a lagging reader may get a
step's worth coalesced), so the invariants checked are: no chunk without tokens, the tokens add
up to the completion, and the finish rides on the chunk of the last ones.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"
QUESTION = [{"role": "user", "content": "List three colors of the rainbow."}]
N = 8


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)


def post(stack: Stack, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    return httpx.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=120)


def sse(stack: Stack, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer, read raw; it must end with [DONE]."""
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    url = f"{stack.base_url}{path}"
    with httpx.stream(
        "POST", url, json={**body, "stream": True}, headers=headers, timeout=120
    ) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def tokenize(stack: Stack, **body: object) -> list[int]:
    return post(stack, "/tokenize", {"model": stack.model, **body}).json()["tokens"]


def greedy(stack: Stack, **extra: object) -> dict:
    body = {"model": stack.model, "prompt": PROMPT, "temperature": 0, "max_tokens": 16, **extra}
    return post(stack, "/v1/completions", body).json()


def test_a_streamed_completion_ends_on_the_chunk_of_its_last_token(stack: Stack) -> None:
    body = {"model": stack.model, "prompt": PROMPT, "temperature": 0, "max_tokens": N,
            "ignore_eos": True, "logprobs": 1, "return_token_ids": True}  # fmt: skip
    chunks = sse(stack, "/v1/completions", body)
    choices = [c["choices"][0] for c in chunks]
    assert all(c["token_ids"] for c in choices), "a chunk without tokens"
    assert sum(len(c["token_ids"]) for c in choices) == N
    assert len(chunks) == len(choices) <= N
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    last = choices[-1]
    assert len(last["logprobs"]["tokens"]) == len(last["token_ids"]) >= 1
    full = greedy(stack, max_tokens=N, ignore_eos=True)["choices"][0]
    assert "".join(c["text"] for c in choices) == full["text"]


def test_the_openai_client_sees_n_tokens_and_the_finish_on_the_last(
    client: openai.OpenAI, stack: Stack
) -> None:
    extra = {"ignore_eos": True, "return_token_ids": True}
    stream = client.completions.create(
        model=stack.model, prompt=PROMPT, temperature=0, max_tokens=N, stream=True,
        extra_body=extra,
    )  # fmt: skip
    chunks = list(stream)
    ids = [c.choices[0].model_extra["token_ids"] for c in chunks]
    assert all(ids) and sum(len(i) for i in ids) == N
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    replies = list(
        client.chat.completions.create(
            model=stack.model, messages=QUESTION, temperature=0, max_tokens=N, stream=True,
            logprobs=True, extra_body=extra,
        )
    )  # fmt: skip
    assert replies[0].choices[0].delta.role == "assistant"
    content = replies[1:]
    chunk_ids = [c.choices[0].model_extra["token_ids"] for c in content]
    assert all(chunk_ids) and sum(len(i) for i in chunk_ids) == N
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len(content[-1].choices[0].logprobs.content) == len(chunk_ids[-1])


def test_continuous_usage_stats_give_usage_on_every_chunk(stack: Stack) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"model": stack.model, "messages": QUESTION, "temperature": 0, "max_tokens": N,
            "ignore_eos": True, "stream_options": options}  # fmt: skip
    chunks = sse(stack, "/v1/chat/completions", body)
    done = [c["usage"]["completion_tokens"] for c in chunks]
    assert done[0] == 0 and done == sorted(done) and done[-1] == N
    assert chunks[-1]["choices"] == []
    prompt = {c["usage"]["prompt_tokens"] for c in chunks}
    assert len(prompt) == 1 and prompt.pop() > 0


def test_matched_stop_for_a_string_a_token_and_length(stack: Stack) -> None:
    text = greedy(stack)["choices"][0]["text"]
    word = text.split()[1]
    by_string = greedy(stack, stop=[word])["choices"][0]
    assert by_string["matched_stop"] == word and by_string["finish_reason"] == "stop"
    assert by_string["text"] == text[: text.index(word)]
    ids = greedy(stack, return_token_ids=True)["choices"][0]["token_ids"]
    by_token = greedy(stack, stop_token_ids=[ids[2]], return_token_ids=True)["choices"][0]
    assert by_token["matched_stop"] == ids[2] and by_token["finish_reason"] == "stop"
    assert by_token["token_ids"] == ids[:3]
    by_length = greedy(stack, max_tokens=3, ignore_eos=True)["choices"][0]
    assert by_length["matched_stop"] is None and by_length["finish_reason"] == "length"


def test_stop_regex_ends_the_text_where_it_first_matches(stack: Stack) -> None:
    text = greedy(stack)["choices"][0]["text"]
    word = text.split()[1]
    pattern = rf"{re.escape(word[0])}{re.escape(word[1:])}"  # a regex that is not a plain string
    cut = re.search(pattern, text)
    assert cut is not None
    reply = greedy(stack, stop_regex=pattern)["choices"][0]
    assert (reply["text"], reply["finish_reason"], reply["matched_stop"]) == (
        text[: cut.start()],
        "stop",
        pattern,
    )
    kept = greedy(stack, stop_regex=[pattern], no_stop_trim=True)["choices"][0]["text"]
    assert kept == text[: cut.end()]
    streamed = sse(stack, "/v1/completions", {"model": stack.model, "prompt": PROMPT,
                   "temperature": 0, "max_tokens": 16, "stop_regex": pattern})  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in streamed) == text[: cut.start()]


def test_return_token_ids_are_what_tokenize_gives(stack: Stack) -> None:
    body = greedy(stack, return_token_ids=True, ignore_eos=True, max_tokens=6)
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == tokenize(stack, prompt=PROMPT)
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"] == 6
    text = post(stack, "/detokenize", {"tokens": choice["token_ids"]}).json()["text"]
    assert text == choice["text"]
    reply = post(stack, "/v1/chat/completions", {"model": stack.model, "messages": QUESTION,
                 "max_tokens": 4, "return_token_ids": True}).json()  # fmt: skip
    assert reply["prompt_token_ids"] == tokenize(stack, messages=QUESTION)
    assert len(reply["choices"][0]["token_ids"]) == reply["usage"]["completion_tokens"]


@pytest.mark.parametrize("side", [None, "left", "right"])
def test_truncation_keeps_the_last_or_first_k_tokens(stack: Stack, side: str | None) -> None:
    ids = tokenize(stack, prompt=PROMPT)
    k = 3
    extra = {"truncation_side": side} if side else {}
    body = greedy(stack, truncate_prompt_tokens=k, return_token_ids=True, max_tokens=2, **extra)
    kept = ids[:k] if side == "right" else ids[-k:]
    assert body["usage"]["prompt_tokens"] == k
    assert body["choices"][0]["prompt_token_ids"] == kept
    chat = post(stack, "/v1/chat/completions", {"model": stack.model, "messages": QUESTION,
                "max_tokens": 2, "truncate_prompt_tokens": k, "return_token_ids": True,
                **extra}).json()  # fmt: skip
    whole = tokenize(stack, messages=QUESTION)
    assert chat["prompt_token_ids"] == (whole[:k] if side == "right" else whole[-k:])
    assert chat["usage"]["prompt_tokens"] == k


def test_chat_echo_repeats_the_continued_assistant_message(stack: Stack) -> None:
    prefix = "The first color is"
    messages = [*QUESTION, {"role": "assistant", "content": prefix}]
    body = {"model": stack.model, "messages": messages, "temperature": 0, "max_tokens": 6,
            "add_generation_prompt": False, "continue_final_message": True}  # fmt: skip
    plain = post(stack, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(stack, "/v1/chat/completions", {**body, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == prefix + plain
    chunks = sse(stack, "/v1/chat/completions", {**body, "echo": True})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == prefix + plain


def test_use_beam_search_is_refused(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=stack.model, prompt=PROMPT, max_tokens=2, extra_body={"use_beam_search": True}
        )
    assert err.value.param == "use_beam_search" and "not offered" in err.value.message


def test_a_role_the_template_renders_is_passed_through(stack: Stack) -> None:
    messages = [*QUESTION, {"role": "ipython", "content": "red, green"}]
    ids = tokenize(stack, messages=messages)
    text = post(stack, "/detokenize", {"tokens": ids, "skip_special_tokens": False}).json()["text"]
    assert "ipython\nred, green" in text
    reply = post(stack, "/v1/chat/completions", {"model": stack.model, "messages": messages,
                 "max_tokens": 2})  # fmt: skip
    assert reply.status_code == 200, reply.text


def test_errors_name_the_offending_value(stack: Stack) -> None:
    cases = [
        ({"logit_bias": {"49153": 1}}, "logit_bias", "token id 49153 is out of vocabulary"),
        ({"stop_token_ids": [60000]}, "stop_token_ids", "token id 60000 is out of vocabulary"),
        (
            {"prompt": [1, 49152]},
            "prompt",
            "token id 49152 is out of vocabulary (vocab size 49152)",
        ),
    ]
    for extra, param, message in cases:
        response = post(stack, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param, response.text
        assert message in error["message"]
    n = len(tokenize(stack, prompt=PROMPT))
    response = post(stack, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2045})
    assert response.json()["error"]["message"] == (
        f"This model's maximum context length is 2048 tokens. However, you requested {n + 2045} "
        f"tokens ({n} in the messages, 2045 in the completion). Please reduce the length of the "
        "messages or completion."
    )


def test_model_objects_carry_root_and_parent(client: openai.OpenAI, stack: Stack) -> None:
    (model,) = client.models.list().data
    assert model.model_extra["root"] and model.model_extra["parent"] is None
    assert client.models.retrieve(stack.model).model_extra["root"] == model.model_extra["root"]


def test_invocations_answer_as_chat_or_completion_and_load_counts_streams(stack: Stack) -> None:
    """vLLM's SageMaker route picks chat or completion by the body; GET /load counts the
    generation requests in flight: 1 while a stream is open, 0 once it ended."""
    chat = {"model": stack.model, "messages": QUESTION, "temperature": 0, "max_tokens": N}
    via_route = post(stack, "/v1/chat/completions", chat).json()
    via_invocations = post(stack, "/invocations", chat).json()
    assert via_invocations["object"] == "chat.completion"
    assert via_invocations["choices"][0]["message"] == via_route["choices"][0]["message"]
    completion = greedy(stack)
    invoked = post(stack, "/invocations", {"model": stack.model, "prompt": PROMPT,
                   "temperature": 0, "max_tokens": 16}).json()  # fmt: skip
    assert invoked["object"] == "text_completion"
    assert invoked["choices"][0]["text"] == completion["choices"][0]["text"]
    neither = post(stack, "/invocations", {"model": stack.model, "input": "hi"})
    assert neither.status_code == 400 and neither.json()["error"]["param"] == "messages"

    def load() -> int:
        return httpx.get(f"{stack.base_url}/load", timeout=10).json()["server_load"]

    headers = {"Authorization": f"Bearer {stack.api_key}"}
    body = {"model": stack.model, "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/completions", json=body, headers=headers, timeout=120
    ) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # generating now
        assert load() == 1
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    deadline = time.monotonic() + 5  # the count drops when the response's last byte is sent
    while load() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load() == 0
