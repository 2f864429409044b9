"""Hostile input gets a clean 4xx with an OpenAI error body, never a 500.

The app runs in-process with the real `Backend` (its model checks, prompt limits and context
fitting) over a toy tokenizer (one token per character) and a scheduler stand-in that encodes each
request to protobuf, as the real client does, before answering "ok".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from services.gateway.app import build_app
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.convert import generate_request_to_pb
from services.gateway.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    error_response,
)
from services.gateway.events import SampleEnd, TokenChunk
from services.gateway.generation import Generation
from services.gateway.json_body import MAX_DEPTH, check_depth
from services.gateway.metrics import GatewayMetrics, RequestMetrics
from services.gateway.openai_responses import ResponseStore
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.sampling import MAX_CHARS_PER_TOKEN, GenerationInput, chat_texts
from tests.gateway.fakes import FakeScheduler, FakeStream, FakeTokenizer, end_of, ids_of
from tests.gateway.hostile import (
    BASE,
    CHAT,
    COMPLETIONS,
    GENERATE,
    Case,
    cases,
    check_answer,
    dumps,
)
from tests.gateway.test_fields import MODEL

OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
LIMIT = 4 * 2**20
VOCAB = MODEL.vocab_size  # ids up to int32 pass the request models; past the vocabulary, a 400
TEN_MB = 10_000_000
LATENCY_S = 0.1  # the contract: a too-large body is refused in well under this


class CharTokenizer(FakeTokenizer):
    """One token per character; counts the prompts it was asked to tokenize."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def encode(self, text: str) -> list[int]:
        self.calls += 1
        return ids_of(text)

    async def apply_chat_template(self, req: ChatCompletionRequest) -> list[int]:
        """The texts joined, by a template that renders OpenAI's roles only (refused as the
        tokenizer service refuses a role its template drops)."""
        self.calls += 1
        for i, message in enumerate(req.messages):
            if message.role not in OPENAI_ROLES:
                raise InvalidRequest(
                    f"the chat template does not render role {message.role!r} (messages[{i}])"
                )
        return ids_of("".join(chat_texts(req)))


class EncodingScheduler(FakeScheduler):
    """Answers "ok" to every sample once the request has been encoded as the scheduler would
    receive it, with as many logprobs and top logprobs per token as the request asked for; the
    sample ends on the length limit where max_tokens is 2 ("ok"'s length), else on a stop."""

    def __init__(self) -> None:
        super().__init__([])

    def generate(self, inp: GenerationInput, timeout_s: float, traceparent: str = ""):  # type: ignore[no-untyped-def]
        generate_request_to_pb(inp)  # raises on a value protobuf cannot carry
        s, ids = inp.sampling, ids_of("ok")
        k = s.top_logprobs
        lps = [-0.5] * len(ids) if s.logprobs else []
        tops = [t for t in ids for _ in range(k)] if s.logprobs else []
        events: list[TokenChunk | SampleEnd | Exception] = []
        for i in range(s.n):
            events.append(TokenChunk(i, ids, lps, tops, [-0.5] * len(tops), 3, len(ids), 1))
            events.append(end_of("ok", "length" if s.max_tokens == len(ids) else "stop", index=i))
        self.stream = FakeStream(events)
        return self.stream


class FakeBackend(Backend):
    """The real Backend's request handling with in-process stand-ins for its services."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.tokenizer = CharTokenizer()  # type: ignore[assignment]
        self.metrics = GatewayMetrics()
        self.responses = ResponseStore(cfg.max_stored_responses)
        self.created = 1
        self._model = MODEL
        self._warmed_up = True
        self._tasks = []

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        scheduler = EncodingScheduler()
        metrics = RequestMetrics.disabled()
        return Generation(inp, scheduler, self.tokenizer, metrics, 60.0)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    cfg = GatewayConfig(max_request_bytes=LIMIT)
    app = build_app(cfg, backend_factory=FakeBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def send(client: TestClient, case: Case):  # type: ignore[no-untyped-def]
    headers = {"Content-Type": case.content_type}
    return client.request(case.method, case.path, content=case.body, headers=headers)


CASES = cases(LIMIT)


def test_the_table_is_large() -> None:
    assert len(CASES) >= 250
    assert {c.path for c in CASES} >= set(BASE)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_a_clean_4xx(client: TestClient, case: Case) -> None:
    response = send(client, case)
    check_answer(case, response.status_code, response.headers, response.content)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "\ud83d\ude00"}], "seed": 2**64 - 1}),
        (COMPLETIONS, {"prompt": [0, VOCAB - 1], "top_k": 2**31 - 1, "logit_bias": {"7": 100}}),
        (COMPLETIONS, {"prompt": "hi", "temperature": 1, "repetition_penalty": 2, "n": 1}),
        (GENERATE, {"input_ids": [VOCAB - 1], "sampling_params": {"sampling_seed": -(2**63)}}),
        (GENERATE, {"text": "hi", "rid": "my-id 1", "sampling_params": {"temperature": 1e30}}),
        (CHAT, {**BASE[CHAT], "x": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1))}),
        (CHAT, {"messages": [{"role": "user", "content": "x" * (MODEL.context_length - 1)}]}),
    ],
    ids=["emoji-pair", "int32-max", "int-for-float", "seed-min", "big-temp", "depth-64", "long"],
)
def test_values_at_the_limits_are_accepted(client: TestClient, path: str, body: dict) -> None:
    if path != GENERATE:
        body = {**body, "max_tokens": 1}
    response = client.post(path, content=dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_a_prompt_past_the_character_limit_never_reaches_the_tokenizer(
    client: TestClient,
) -> None:
    tokenizer = client.app.state.backend.tokenizer
    before = tokenizer.calls
    limit = MODEL.context_length * MAX_CHARS_PER_TOKEN
    for path, body in [
        (CHAT, {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}),
        (COMPLETIONS, {"prompt": "x" * (limit + 1)}),
        (GENERATE, {"text": "x" * (limit + 1)}),
    ]:
        error = client.post(path, json=body).json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert f"maximum context length is {MODEL.context_length} tokens" in error["message"]
    assert tokenizer.calls == before
    ok = client.post(COMPLETIONS, json={"prompt": "x" * 100, "max_tokens": 1})
    assert ok.status_code == 200 and tokenizer.calls == before + 1


def test_ten_megabytes_with_content_length_are_refused_unread_and_fast(
    client: TestClient,
) -> None:
    started = time.perf_counter()
    response = client.post(COMPLETIONS, content=b"x" * TEN_MB, headers={"Content-Type": "a/b"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert elapsed < LATENCY_S, elapsed
    assert client.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_a_chunked_body_is_refused_once_it_crosses_the_limit(client: TestClient) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(TEN_MB // 2**16):
            sent += 2**16
            yield b"x" * 2**16

    started = time.perf_counter()
    response = client.post(COMPLETIONS, content=chunks())  # no Content-Length: chunked
    elapsed = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert elapsed < LATENCY_S * 5, elapsed  # the client builds the chunks in this time too
    assert client.get("/health").status_code == 200


def test_a_body_at_the_limit_is_read() -> None:
    app = build_app(GatewayConfig(max_request_bytes=100), backend_factory=FakeBackend)  # type: ignore[arg-type]
    with TestClient(app) as small:
        body = json.dumps({"prompt": "hi", "max_tokens": 1, "user": ""}).encode()
        body += b" " * (100 - len(body))
        assert small.post(COMPLETIONS, content=body).status_code == 200
        assert small.post(COMPLETIONS, content=body + b" ").status_code == 413


def test_depth_is_checked_without_recursion() -> None:
    check_depth(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    check_depth(b'{"a": "' + b"[" * 10_000 + b'"}')  # brackets inside a string do not count
    check_depth(b'{"a": "\\"' + b"[" * 10_000 + b'"}')
    for body in [b"[" * (MAX_DEPTH + 1), b"[" * 1_000_000]:
        with pytest.raises(Exception, match="nested too deeply"):
            check_depth(body)


def test_an_error_quoting_a_lone_surrogate_still_encodes() -> None:
    response = error_response(ModelNotFound("The model `\ud800` does not exist.", param="model"))
    assert response.status_code == 404
    assert json.loads(response.body)["error"]["message"] == "The model `\ud800` does not exist."


def test_the_real_backend_checks_prompt_characters_before_tokenizing() -> None:
    backend = FakeBackend(GatewayConfig())
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x" * (MODEL.context_length * 32 + 1)}]}
    )
    with pytest.raises(ContextLengthExceeded) as err:
        asyncio.run(backend.chat_input(req, "r"))
    assert err.value.param == "messages" and backend.tokenizer.calls == 0  # type: ignore[attr-defined]


def test_the_openapi_document_carries_the_models_and_their_ranges(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]) == set(BASE) and doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    top_k = schemas["NativeSamplingParams"]["properties"]["top_k"]
    assert (top_k["minimum"], top_k["maximum"], top_k["type"]) == (-1, 2**31 - 1, "integer")
    for path in BASE:
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert ref["$ref"].rsplit("/", 1)[-1] in schemas
