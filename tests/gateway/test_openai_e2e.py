"""The OpenAI API through the real services and model, with the `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "List three colors of the rainbow."}]
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.api_key, max_retries=0)


def greedy_chat(client: openai.OpenAI, stack: Stack, **kw):
    return client.chat.completions.create(
        model=stack.model, messages=QUESTION, temperature=0, max_tokens=16, **kw
    )


def test_chat_stream_deltas_join_to_the_greedy_answer(client: openai.OpenAI, stack: Stack) -> None:
    full = greedy_chat(client, stack)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == stack.model
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 16
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(greedy_chat(client, stack, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_completion_stream_deltas_join_to_the_greedy_answer(
    client: openai.OpenAI, stack: Stack
) -> None:
    kw = {"model": stack.model, "prompt": PROMPT, "temperature": 0, "max_tokens": 12}
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].text
    streamed = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text
    assert streamed[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_n_samples(client: openai.OpenAI, stack: Stack) -> None:
    reply = client.chat.completions.create(
        model=stack.model, messages=QUESTION, n=2, temperature=1.0, max_tokens=8, seed=7
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage.completion_tokens <= 16


def test_stop_string_is_never_in_the_output(client: openai.OpenAI, stack: Stack) -> None:
    answer = greedy_chat(client, stack).choices[0].message.content
    words = answer.split()
    assert len(words) >= 3, answer
    stop = words[2]
    cut = answer.index(stop)
    for stream in (False, True):
        reply = greedy_chat(client, stack, stop=[stop, "never-appears"], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert text == answer[:cut] and stop not in text
        assert reason == "stop"


def test_max_tokens_gives_length(client: openai.OpenAI, stack: Stack) -> None:
    reply = client.completions.create(
        model=stack.model, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    chat = greedy_chat(client, stack, max_completion_tokens=2)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 2


def test_chat_logprobs_shape(client: openai.OpenAI, stack: Stack) -> None:
    reply = greedy_chat(client, stack, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens - (
        reply.choices[0].finish_reason == "stop"
    )
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.token, str)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely one
    text = b"".join(bytes(e.bytes) for e in content).decode()
    assert text == reply.choices[0].message.content


def test_completion_logprobs_shape(client: openai.OpenAI, stack: Stack) -> None:
    reply = client.completions.create(
        model=stack.model, prompt=PROMPT, temperature=0, max_tokens=6, logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(
        1 <= len(top) <= 3 and tok in top
        for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True)
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert "".join(lp.tokens) == reply.choices[0].text


def test_usage_chunk_when_asked(client: openai.OpenAI, stack: Stack) -> None:
    chunks = list(greedy_chat(client, stack, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(greedy_chat(client, stack, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_same_seed_same_text(client: openai.OpenAI, stack: Stack) -> None:
    def sample() -> str:
        return client.completions.create(
            model=stack.model, prompt=PROMPT, temperature=0.8, seed=1234, max_tokens=12,
            extra_body={"ignore_eos": True},
        ).choices[0].text  # fmt: skip

    assert sample() == sample()


def test_repeated_long_prompt_hits_the_cache(client: openai.OpenAI, stack: Stack) -> None:
    prompt = " ".join(f"item{i}" for i in range(110))  # ~300 tokens
    first = client.completions.create(model=stack.model, prompt=prompt, max_tokens=2)
    second = client.completions.create(model=stack.model, prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens >= 300
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_models(client: openai.OpenAI, stack: Stack) -> None:
    assert [m.id for m in client.models.list().data] == [stack.model]
    assert client.models.retrieve(stack.model).id == stack.model


def test_native_generate(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    by_text = httpx.post(
        f"{stack.base_url}/generate",
        json={"text": PROMPT, "sampling_params": params},
        headers=headers,
        timeout=60,
    ).json()
    assert len(by_text["output_ids"]) == 4 and by_text["text"]
    assert by_text["meta_info"]["finish_reason"] == {"type": "length"}
    ids = httpx.post(
        f"{stack.base_url}/generate",
        json={"input_ids": [1, 504, 3575], "sampling_params": params},
        headers=headers,
        timeout=60,
    ).json()
    assert len(ids["output_ids"]) == 4 and ids["meta_info"]["prompt_tokens"] == 3


def test_native_generate_batch(stack: Stack) -> None:
    """SGLang's batch forms of /generate: a list of texts or of id lists, `n` samples each, the
    answers prompt-major with each prompt's own id and counts, the greedy tokens of each prompt
    sent alone; streamed, every event's `index` names its sample and the last ones agree."""
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True, "n": 2}
    texts = [PROMPT, "Once upon a time"]

    def post(body: dict) -> httpx.Response:
        return httpx.post(f"{stack.base_url}/generate", json=body, headers=headers, timeout=60)

    alone = [post({"text": t, "sampling_params": {**params, "n": 1}}).json() for t in texts]
    batch = post({"text": texts, "sampling_params": params, "rid": ["b-a", "b-b"]}).json()
    assert [b["meta_info"]["id"] for b in batch] == ["b-a", "b-a", "b-b", "b-b"]
    assert [b["output_ids"] for b in batch] == [a["output_ids"] for a in alone for _ in (0, 1)]
    counts = [b["meta_info"]["prompt_tokens"] for b in batch]
    assert counts == [a["meta_info"]["prompt_tokens"] for a in alone for _ in (0, 1)]
    assert counts[0] != counts[2]  # each prompt's own count, not the request's total

    ids = [[1, 504, 3575], [1, 2, 3, 4, 5]]
    one_each = [{"max_new_tokens": m, "temperature": 0, "ignore_eos": True} for m in (3, 6)]
    by_ids = post({"input_ids": ids, "sampling_params": one_each}).json()
    assert [len(b["output_ids"]) for b in by_ids] == [3, 6]  # each prompt its own parameters
    assert [b["meta_info"]["prompt_tokens"] for b in by_ids] == [3, 5]

    last: dict[int, dict] = {}
    body = {"text": texts, "sampling_params": params, "stream": True}
    with httpx.stream(
        "POST", f"{stack.base_url}/generate", json=body, headers=headers, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                last[event["index"]] = event
    assert sorted(last) == [0, 1, 2, 3]
    assert [last[i]["output_ids"] for i in range(4)] == [b["output_ids"] for b in batch]

    bad = post({"text": texts, "rid": "one-id"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rid"


def test_no_effect_fields_change_nothing_and_rejected_ones_are_a_400(
    client: openai.OpenAI, stack: Stack
) -> None:
    plain = greedy_chat(client, stack)
    same = greedy_chat(
        client, stack, user="u-1", store=True, metadata={"team": "a"}, prompt_cache_key="k"
    )
    assert same.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        greedy_chat(client, stack, modalities=["text", "audio"])
    assert err.value.param == "modalities" and err.value.status_code == 400


def test_min_tokens_holds_back_stop_strings_and_stop_tokens(
    client: openai.OpenAI, stack: Stack, default_model_dir
) -> None:
    from transformers import AutoTokenizer

    comma = AutoTokenizer.from_pretrained(default_model_dir).convert_tokens_to_ids(",")
    kw = {"model": stack.model, "prompt": "Here are the months of the year: January,",
          "max_tokens": 12, "temperature": 0}  # fmt: skip
    for stop in ({"stop": [","]}, {"extra_body": {"stop_token_ids": [comma]}}):
        extra = stop.pop("extra_body", {})
        short = client.completions.create(**kw, **stop, extra_body=extra)
        held = client.completions.create(**kw, **stop, extra_body={**extra, "min_tokens": 8})
        assert short.usage.completion_tokens < 8 <= held.usage.completion_tokens, stop
        assert held.choices[0].text.startswith(short.choices[0].text)
