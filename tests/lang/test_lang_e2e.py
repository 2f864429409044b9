"""Programs through a real server with the default model: the chat template, fork and the
radix cache, select against Hugging Face, constrained gen, batches, streaming and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM

from radixserve.lang import (
    ProgramState,
    RuntimeEndpoint,
    ServerError,
    assistant,
    function,
    gen,
    select,
    system,
    user,
)
from tests.lang.conftest import API_KEY

pytestmark = pytest.mark.slow
SYSTEM = "You are a concise assistant. Answer in one sentence."
QUESTION = "What is the tallest mountain on Earth?"
ANSWER_TOKENS = 24


@function
def tutor(s: Any, question: str, with_system: bool) -> Any:
    if with_system:
        s += system(SYSTEM)
    s += user(question)
    with s.assistant():
        s["prompt"] = s.text()  # what the answer is generated after
        s += gen("answer", max_tokens=ANSWER_TOKENS)
    s["shared"] = s.text()
    forks = s.fork(2)
    forks[0] += user("Say it shorter.")
    forks[1] += user("Give one more fact.")
    forks += assistant(gen("detail", max_tokens=8))
    forks.join()
    s += user("Was your first answer correct?")
    s += assistant(select("verdict", ["Yes", "No"]))
    return forks


@pytest.fixture(scope="module", params=[True, False], ids=["system", "no-system"])
def tutored(request: pytest.FixtureRequest, backend: RuntimeEndpoint) -> ProgramState:
    return tutor.run(question=QUESTION, with_system=request.param, temperature=0, backend=backend)


def post(server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{server}{path}", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_program_renders_and_answers_as_the_chat_route(
    tutored: ProgramState, server: str
) -> None:
    opened_with_system = tutored.messages()[0]["role"] == "system"
    messages = tutored.messages()[: 2 if opened_with_system else 1]
    chat = post(
        server,
        "/v1/chat/completions",
        {"messages": messages, "temperature": 0, "max_tokens": ANSWER_TOKENS},
    )
    assert tutored["answer"] and tutored["answer"] == chat["choices"][0]["message"]["content"]
    # The same prompt token for token, with or without a system block.
    rendered = post(server, "/tokenize", {"messages": messages, "add_generation_prompt": True})
    ours = post(server, "/tokenize", {"prompt": tutored["prompt"]})
    assert ours["tokens"] == rendered["tokens"]
    assert tutored.get_meta_info("answer")["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    roles = [m["role"] for m in tutored.messages()]
    assert roles == ["system"] * opened_with_system + ["user", "assistant"] * 2
    assert tutored["verdict"] in ("Yes", "No")
    assert tutored.text().endswith(f"{tutored['verdict']}<|im_end|>\n")
    forks = tutored.ret_value
    assert tutored["detail"] == [forks[0]["detail"], forks[1]["detail"]]
    assert all(f.text().startswith(tutored["shared"]) for f in forks)


def test_fork_branches_reuse_the_shared_prefix_from_the_cache(
    tutored: ProgramState, backend: RuntimeEndpoint
) -> None:
    (shared,) = backend.tokenize([tutored["shared"]])
    for fork in tutored.ret_value:
        info = fork.get_meta_info("detail")
        # All but the answer's last token and the assistant suffix (which the model never saw
        # before the fork) come from the cache: cached_tokens counts the prompt tokens reused.
        assert info["cached_tokens"] >= len(shared) - 3, (info, len(shared))
        assert info["prompt_tokens"] > len(shared)


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def test_select_picks_what_hugging_faces_normalized_logprobs_pick(
    backend: RuntimeEndpoint, hf_model: Any
) -> None:
    choices = ["Paris", "London", "the city of New York"]

    @function
    def capital(s: Any) -> None:
        s += user("What is the capital of France? Answer with the city's name.")
        with s.assistant():
            s["prefix"] = s.text()
            s += select("city", choices)

    state = capital.run(backend=backend)
    prefix_ids, *choice_ids = backend.tokenize(
        [state["prefix"], *(state["prefix"] + c for c in choices)]
    )
    expected = []
    for ids in choice_ids:
        start = 0  # where prefix + choice leaves the prefix's ids
        while start < len(prefix_ids) and ids[start] == prefix_ids[start]:
            start += 1
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
        picked = logp[start - 1 : len(ids) - 1].gather(1, torch.tensor(ids[start:])[:, None])
        expected.append(picked.mean().item())
    got = state.get_meta_info("city")["normalized_prompt_logprobs"]
    assert got == pytest.approx(expected, abs=1e-3)
    assert state["city"] == choices[max(range(3), key=expected.__getitem__)]
    assert state.text().endswith(state["city"] + "<|im_end|>\n")


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_regex_and_json_schema_constrain_gen(backend: RuntimeEndpoint) -> None:
    @function
    def profile(s: Any) -> None:
        s += user("Invent a person. Give a phone number, then a JSON object.")
        s += assistant("Phone: " + gen("phone", regex=r"\d{3}-\d{4}", max_tokens=16))
        s += user("Now the JSON.")
        s += assistant(gen("person", json_schema=SCHEMA, max_tokens=64))

    state = profile.run(temperature=0, backend=backend)
    assert re.fullmatch(r"\d{3}-\d{4}", state["phone"]), state["phone"]
    jsonschema.validate(json.loads(state["person"]), SCHEMA)


@function
def quiz(s: Any, topic: str) -> None:
    s += user(f"Name one fact about {topic}.")
    s += assistant(gen("fact", max_tokens=12))


def test_run_batch_returns_the_states_in_order(backend: RuntimeEndpoint) -> None:
    topics = ["rivers", "owls", "copper", "tea", "glaciers", "chess"]
    states = quiz.run_batch([{"topic": t} for t in topics], temperature=0, backend=backend)
    assert [s.messages()[0]["content"] for s in states] == [
        f"Name one fact about {t}." for t in topics
    ]
    for state in states:
        assert state.error() is None and state["fact"]
        assert state.get_meta_info("fact")["completion_tokens"] >= 1


def test_streamed_chunks_add_up_to_the_variable_and_the_text(backend: RuntimeEndpoint) -> None:
    state = quiz.run(
        topic="volcanoes", temperature=0, max_new_tokens=16, stream=True, backend=backend
    )
    chunks = list(state.text_iter("fact"))
    assert len(chunks) > 1 and "".join(chunks) == state["fact"]
    assert "".join(state.text_iter()) == state.text()


def test_server_errors_raise_with_the_servers_message(
    server: str, backend: RuntimeEndpoint
) -> None:
    @function
    def bad(s: Any, **options: Any) -> None:
        s += "Say something: " + gen("x", max_tokens=4, **options)

    with pytest.raises(ServerError, match=r"/generate: HTTP 400: invalid grammar") as err:
        bad.run(regex="(a", backend=backend)
    assert err.value.status == 400 and "parenthesis" in err.value.message
    with pytest.raises(ServerError, match="temperature") as err:
        bad.run(temperature=-1.0, backend=backend)
    assert err.value.status == 400
    with pytest.raises(ServerError, match="HTTP 401"):
        RuntimeEndpoint(server, api_key="wrong")
