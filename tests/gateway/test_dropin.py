"""vLLM's and SGLang's conventions and extensions on the OpenAI routes, in process.

The app runs with the real `Backend` request handling over the toy tokenizer of test_hostile (one
token per character) and a scheduler stand-in that streams a scripted answer one token per step,
as the real scheduler does for a client that keeps up. Clients are the `openai` package (over
the in-process app) and raw server-sent events.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace

import openai
import pytest
from starlette.testclient import TestClient

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.convert import detokenize_setup_to_pb
from services.gateway.events import SampleEnd, TokenChunk
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.sampling import GenerationInput, chat_texts
from tests.gateway.fakes import STEP, FakeScheduler, FakeStream, ids_of
from tests.gateway.test_fields import MODEL
from tests.gateway.test_hostile import CharTokenizer, FakeBackend

CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
STOP_TOKEN = 7  # the toy model's stop token (an EOS or a stop_token_ids id)
Script = Callable[[GenerationInput], list]


def answer(text: str, reason: str = "length", apart: bool = False) -> Script:
    """Each sample answers `text`, one token per step, then ends with `reason` ("stop": a stop
    token, which comes a step after the text, as the real scheduler sends it). `apart`: the end
    comes in a step of its own."""

    def script(inp: GenerationInput) -> list:
        events: list = []
        for i in range(inp.sampling.n):
            events += tokens(text, i, inp)
            apart_ = apart or reason == "stop"
            count = len(text) + (reason == "stop")
            stop = STOP_TOKEN if reason == "stop" else None
            events += [STEP] * apart_ + [SampleEnd(i, reason, len(inp.input_ids), count, 0, stop)]
        return events

    return script


def tokens(text: str, index: int, inp: GenerationInput) -> list[TokenChunk]:
    """`text` one token per chunk, with logprobs (each token its own best alternative)."""
    sampling, prompt = inp.sampling, len(inp.input_ids)
    k, out = sampling.top_logprobs, []
    for n, token in enumerate(ids_of(text), start=1):
        lps = [-0.25] if sampling.logprobs else []
        tops, top_lps = ([token] * k, [-0.25] * k) if sampling.logprobs else ([], [])
        out.append(TokenChunk(index, [token], lps, tops, top_lps, prompt, n, 0))
    return out


class ScriptedBackend(FakeBackend):
    """The real Backend's request handling; every generation follows `script`."""

    def __init__(self, cfg: GatewayConfig) -> None:
        super().__init__(cfg)
        self.script: Script = answer("hello")
        self.inputs: list[GenerationInput] = []

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        self.inputs.append(inp)
        scheduler = FakeScheduler([])
        scheduler.stream = FakeStream(self.script(inp))
        return Generation(inp, scheduler, self.tokenizer, RequestMetrics.disabled(), 60.0)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = build_app(GatewayConfig(), backend_factory=ScriptedBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)


def backend(client: TestClient) -> ScriptedBackend:
    return client.app.state.backend


def events(client: TestClient, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer, checking it ends with [DONE]."""
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def chat(content: str = "hi", **fields: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], **fields}


# ---- finish_reason on the last token's chunk ---------------------------------------------------


def test_a_streamed_completion_of_n_tokens_arrives_in_n_chunks(client: TestClient) -> None:
    chunks = events(client, COMPLETIONS, {"prompt": "hi", "max_tokens": 5, "logprobs": 1})
    choices = [c["choices"][0] for c in chunks]
    assert [c["text"] for c in choices] == list("hello")
    assert [c["finish_reason"] for c in choices] == [None] * 4 + ["length"]
    # The last chunk carries its own token's logprobs, not empty lists.
    assert [c["logprobs"]["tokens"] for c in choices] == [[t] for t in "hello"]
    assert choices[-1]["logprobs"]["text_offset"] == [4]


def test_the_openai_client_sees_the_finish_on_the_last_token(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(model="m", prompt="hi", max_tokens=5, stream=True, logprobs=0)
    chunks = list(stream)
    assert [c.choices[0].text for c in chunks] == list("hello")
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].logprobs.tokens == ["o"]
    replies = list(
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, logprobs=True
        )
    )
    assert replies[0].choices[0].delta.role == "assistant"
    content = replies[1:]
    assert [c.choices[0].delta.content for c in content] == list("hello")
    assert [c.choices[0].finish_reason for c in content] == [None] * 4 + ["length"]
    assert [e.token for e in content[-1].choices[0].logprobs.content] == ["o"]


def test_a_streamed_chat_of_n_tokens_arrives_in_n_chunks_after_the_role(client: TestClient) -> None:
    chunks = events(client, CHAT, chat(logprobs=True, top_logprobs=1))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas[1:]] == list("hello")
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length" and last["matched_stop"] is None
    assert [e["token"] for e in last["logprobs"]["content"]] == ["o"]


def test_text_held_back_for_a_stop_string_comes_with_the_finish(client: TestClient) -> None:
    backend(client).script = answer("abXY")
    chunks = events(client, COMPLETIONS, {"prompt": "hi", "stop": ["XYZ"]})
    # "X" and "Y" may start the stop string: held back, each token still gets its chunk.
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "", "XY"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_token_completing_a_stop_string_carries_the_finish(client: TestClient) -> None:
    backend(client).script = answer("abXYZcd")
    chunks = events(client, COMPLETIONS, {"prompt": "hi", "stop": ["XYZ"]})
    assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", "", "", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["matched_stop"] == "XYZ"


def test_each_of_n_choices_finishes_on_its_own_last_chunk(client: TestClient) -> None:
    chunks = events(client, COMPLETIONS, {"prompt": "hi", "n": 2})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [c["text"] for c in mine] == list("hello")
        assert [c["finish_reason"] for c in mine] == [None] * 4 + ["length"]


def test_a_finish_with_no_new_text_still_has_its_chunk(client: TestClient) -> None:
    backend(client).script = answer("hi", reason="stop")  # the stop token comes a step later
    chunks = events(client, COMPLETIONS, {"prompt": "hi"})
    assert [c["choices"][0]["text"] for c in chunks] == ["h", "i", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["matched_stop"] == STOP_TOKEN
    backend(client).script = answer("hi", reason="abort", apart=True)
    last = events(client, CHAT, chat())[-1]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "length"


# ---- continuous usage --------------------------------------------------------------------------


def test_continuous_usage_stats_put_the_usage_on_every_chunk(client: TestClient) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in ((CHAT, chat()), (COMPLETIONS, {"prompt": "hi"})):
        chunks = events(client, path, {**body, "stream_options": options})
        usages = [c["usage"] for c in chunks]
        assert all(u is not None for u in usages), path
        done = [u["completion_tokens"] for u in usages]
        assert done == sorted(done) and done[-1] == 5, path
        assert chunks[-1]["choices"] == [] and usages[-1]["prompt_tokens"] == 2
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = events(client, CHAT, chat(stream_options={"include_usage": True}))
    assert [c["usage"] is None for c in plain] == [True] * 6 + [False]


def test_continuous_usage_through_the_openai_client(sdk: openai.OpenAI) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options=options,  # type: ignore[typeddict-unknown-key]
        )
    )  # fmt: skip
    done = [c.usage.completion_tokens for c in chunks]
    assert done == [0, 1, 2, 3, 4, 5, 5]


# ---- matched_stop, stop_regex, no_stop_trim ----------------------------------------------------


def test_matched_stop_names_what_ended_each_choice(client: TestClient) -> None:
    backend(client).script = answer("abXYZcd")
    body = client.post(COMPLETIONS, json={"prompt": "hi", "stop": ["XYZ"]}).json()
    assert body["choices"][0]["matched_stop"] == "XYZ" and body["choices"][0]["text"] == "ab"
    backend(client).script = answer("ab", reason="stop")
    body = client.post(CHAT, json=chat(stop_token_ids=[STOP_TOKEN])).json()
    assert body["choices"][0]["matched_stop"] == STOP_TOKEN
    assert body["choices"][0]["finish_reason"] == "stop"
    backend(client).script = answer("ab")
    body = client.post(CHAT, json=chat()).json()
    assert body["choices"][0]["matched_stop"] is None
    assert body["choices"][0]["finish_reason"] == "length"
    backend(client).script = answer("ab", reason="stop")
    native = client.post(GENERATE, json={"text": "hi"}).json()
    assert native["meta_info"]["finish_reason"] == {"type": "stop", "matched": STOP_TOKEN}


def test_stop_regex_ends_the_text_where_it_first_matches(client: TestClient) -> None:
    backend(client).script = answer("Total: 42 apples")
    body = client.post(COMPLETIONS, json={"prompt": "hi", "stop_regex": r"\d+"}).json()
    choice = body["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["matched_stop"]) == (
        "Total: ",
        "stop",
        r"\d+",
    )
    kept = client.post(CHAT, json=chat(stop_regex=[r"\d+"], no_stop_trim=True)).json()
    assert kept["choices"][0]["message"]["content"] == "Total: 4"
    streamed = events(client, COMPLETIONS, {"prompt": "hi", "stop_regex": [r"apples?\b", "4"]})
    assert "".join(c["choices"][0]["text"] for c in streamed) == "Total: "
    native = client.post(
        GENERATE, json={"text": "hi", "sampling_params": {"stop_regex": "4", "no_stop_trim": True}}
    ).json()
    assert native["text"] == "Total: 4" and native["meta_info"]["finish_reason"]["matched"] == "4"


@pytest.mark.parametrize(("pattern", "why"), [("(", "invalid regular expression"), ("x*", "empty")])
def test_a_bad_stop_regex_is_a_400_naming_it(client: TestClient, pattern: str, why: str) -> None:
    response = client.post(COMPLETIONS, json={"prompt": "hi", "stop_regex": pattern})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "stop_regex" and why in error["message"]


def test_no_stop_trim_keeps_a_stop_string(client: TestClient) -> None:
    backend(client).script = answer("abXYZcd")
    body = client.post(COMPLETIONS, json={"prompt": "hi", "stop": "XYZ", "no_stop_trim": True})
    assert body.json()["choices"][0]["text"] == "abXYZ"


# ---- return_token_ids, truncate_prompt_tokens --------------------------------------------------


def test_return_token_ids_gives_the_prompt_and_output_ids(client: TestClient) -> None:
    backend(client).script = answer("ok", reason="stop")
    body = client.post(COMPLETIONS, json={"prompt": "hi you", "return_token_ids": True}).json()
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == ids_of("hi you")
    # The stop token is generated too (and counted in usage).
    assert choice["token_ids"] == [*ids_of("ok"), STOP_TOKEN]
    assert len(choice["token_ids"]) == body["usage"]["completion_tokens"]
    reply = client.post(CHAT, json=chat("hey", return_token_ids=True)).json()
    assert reply["prompt_token_ids"] == ids_of("hey")
    assert reply["choices"][0]["token_ids"] == [*ids_of("ok"), STOP_TOKEN]
    assert "token_ids" not in client.post(CHAT, json=chat()).json()["choices"][0]


def test_streamed_token_ids_come_with_each_chunk(client: TestClient) -> None:
    chunks = events(client, COMPLETIONS, {"prompt": "hi", "return_token_ids": True, "n": 2})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert [c["token_ids"] for c in mine] == [[t] for t in ids_of("hello")]
        assert mine[0]["prompt_token_ids"] == ids_of("hi")
        assert all("prompt_token_ids" not in c for c in mine[1:])
    chat_chunks = events(client, CHAT, chat("yo", return_token_ids=True))
    assert chat_chunks[0]["prompt_token_ids"] == ids_of("yo")
    assert [c["choices"][0]["token_ids"] for c in chat_chunks[1:]] == [[t] for t in ids_of("hello")]


@pytest.mark.parametrize(
    ("fields", "kept"),
    [
        ({"truncate_prompt_tokens": 3}, "fgh"),
        ({"truncate_prompt_tokens": 3, "truncation_side": "left"}, "fgh"),
        ({"truncate_prompt_tokens": 3, "truncation_side": "right"}, "abc"),
        ({"truncate_prompt_tokens": 30}, "abcdefgh"),
        ({"truncate_prompt_tokens": -1}, "abcdefgh"),
    ],
)
def test_truncate_prompt_tokens_keeps_the_last_or_first_k(
    client: TestClient, fields: dict, kept: str
) -> None:
    body = {"prompt": "abcdefgh", "return_token_ids": True, **fields}
    choice = client.post(COMPLETIONS, json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == ids_of(kept)
    assert backend(client).inputs[-1].input_ids == ids_of(kept)
    reply = client.post(CHAT, json=chat("abcdefgh", **fields, return_token_ids=True)).json()
    assert reply["prompt_token_ids"] == ids_of(kept)


def test_echo_of_a_truncated_prompt_is_the_text_kept(client: TestClient) -> None:
    body = {"prompt": "abcdefgh", "truncate_prompt_tokens": 2, "echo": True}
    assert client.post(COMPLETIONS, json=body).json()["choices"][0]["text"] == "gh" + "hello"


@pytest.mark.parametrize(
    ("value", "why"), [(0, "-1 (the context length) or at least 1"), (MODEL.context_length + 1, "")]
)
def test_a_bad_truncation_is_a_400_naming_it(client: TestClient, value: int, why: str) -> None:
    response = client.post(COMPLETIONS, json={"prompt": "hi", "truncate_prompt_tokens": value})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "truncate_prompt_tokens" and why in error["message"]


# ---- chat echo, roles, beam search, models -----------------------------------------------------


CONTINUED = [
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "I say: "},
]


def test_chat_echo_puts_the_continued_message_before_the_answer(client: TestClient) -> None:
    body = {
        "messages": CONTINUED,
        "add_generation_prompt": False,
        "continue_final_message": True,
        "echo": True,
    }
    reply = client.post(CHAT, json=body).json()
    assert reply["choices"][0]["message"]["content"] == "I say: hello"
    chunks = events(client, CHAT, body)
    assert chunks[1]["choices"][0]["delta"] == {"content": "I say: "}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "I say: hello"
    plain = client.post(CHAT, json={**body, "echo": False}).json()
    assert plain["choices"][0]["message"]["content"] == "hello"
    # Echo only repeats an assistant message: a last user message is not the answer's start.
    assert client.post(CHAT, json=chat(echo=True)).json()["choices"][0]["message"]["content"] == (
        "hello"
    )


class AnyRoleTokenizer(CharTokenizer):
    """A chat template that renders every role."""

    async def apply_chat_template(self, req: ChatCompletionRequest) -> list[int]:
        return ids_of("".join(f"<{m.role}>" for m in req.messages) + "".join(chat_texts(req)))


def test_a_role_the_template_drops_is_a_400_naming_it(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "ipython", "content": "42"}]
    response = client.post(CHAT, json={"messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[1].role" and "'ipython'" in error["message"]
    backend(client).tokenizer = AnyRoleTokenizer()
    assert client.post(CHAT, json={"messages": messages}).status_code == 200
    assert backend(client).inputs[-1].input_ids[: len("<user><ipython>")] == ids_of(
        "<user><ipython>"
    )


def test_beam_search_is_refused_not_run_greedy(client: TestClient) -> None:
    for path, body in ((CHAT, chat()), (COMPLETIONS, {"prompt": "hi"})):
        response = client.post(path, json={**body, "use_beam_search": True})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "use_beam_search" and "not offered" in error["message"]


def test_model_objects_carry_root_and_parent(client: TestClient) -> None:
    backend(client)._model = replace(MODEL, model_path="/models/smol")
    (card,) = client.get("/v1/models").json()["data"]
    assert (card["root"], card["parent"]) == ("/models/smol", None)
    assert client.get("/v1/models/m").json() == card


# ---- errors naming the offending value ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "bad"),
    [
        (CHAT, chat(logit_bias={"1000": 5}), "logit_bias", 1000),
        (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [2, 49153]}, "stop_token_ids", 49153),
        (COMPLETIONS, {"prompt": [1, 1234, 2]}, "prompt", 1234),
        (COMPLETIONS, {"prompt": [[1], [5, 77777]]}, "prompt", 77777),
        (GENERATE, {"input_ids": [3, 4321]}, "input_ids", 4321),
        (
            GENERATE,
            {"text": "hi", "sampling_params": {"stop_token_ids": [1001]}},
            "sampling_params.stop_token_ids",
            1001,
        ),
    ],
)
def test_an_out_of_vocabulary_id_is_named(
    client: TestClient, path: str, body: dict, param: str, bad: int
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert (
        f"token id {bad} is out of vocabulary (vocab size {MODEL.vocab_size})" in error["message"]
    )


def test_the_context_length_error_has_openais_wording(client: TestClient) -> None:
    prompt = "x" * 2000
    for path, body in ((COMPLETIONS, {"prompt": prompt}), (CHAT, chat(prompt))):
        response = client.post(path, json={**body, "max_tokens": 100})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["message"] == (
            f"This model's maximum context length is {MODEL.context_length} tokens. However, you "
            "requested 2100 tokens (2000 in the messages, 100 in the completion). Please reduce "
            "the length of the messages or completion."
        )
        assert error["code"] == "context_length_exceeded"


def test_stop_regexes_and_no_stop_trim_reach_the_tokenizer(client: TestClient) -> None:
    client.post(COMPLETIONS, json={"prompt": "hi", "stop_regex": r"\d", "no_stop_trim": True})
    setup = detokenize_setup_to_pb(backend(client).inputs[-1], 0)
    assert list(setup.stop_regex) == [r"\d"] and setup.include_stop_str_in_output


def test_streamed_generate_events_are_cumulative_as_sglangs(client: TestClient) -> None:
    """SGLang's /generate stream: every event holds the whole text and ids so far, with counts."""
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 5}, "return_logprob": True}
    chunks = events(client, GENERATE, body)
    assert [c["text"] for c in chunks] == ["h", "he", "hel", "hell", "hello"]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5]
    infos = [c["meta_info"] for c in chunks]
    assert [i["completion_tokens"] for i in infos] == [1, 2, 3, 4, 5]
    assert [len(i["output_token_logprobs"]) for i in infos] == [1, 2, 3, 4, 5]
    assert all(i["prompt_tokens"] > 0 and "cached_tokens" in i for i in infos)
    assert [i["finish_reason"] for i in infos] == [None] * 4 + [{"type": "length"}]
    whole = client.post(GENERATE, json=body).json()
    assert (whole["text"], whole["output_ids"]) == (chunks[-1]["text"], chunks[-1]["output_ids"])
