"""X-Request-Id and the request log (--log-requests), in process.

The app runs with the real `Backend` request handling (see tests/gateway/test_hostile.py) over a
scheduler stand-in that streams "ok!" one token at a time, yielding to the event loop between
tokens, so requests overlap and a client can go away mid-answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from services.common.log import JsonFormatter
from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.sampling import GenerationInput
from tests.gateway.fakes import FakeScheduler, FakeStream, chunks_of, end_of, ids_of
from tests.gateway.test_hostile import FakeBackend

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
ANSWER = "ok!"


def chat(content: str = "hi", **fields: object) -> dict:
    return {"messages": [{"role": "user", "content": content}], **fields}


class SlowStream(FakeStream):
    """Scheduler events that take 5 ms each to come."""

    async def next(self):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.005)
        return await super().next()


class StreamingBackend(FakeBackend):
    """Answers every sample ANSWER a token at a time; counts the streams open at once and keeps
    the request ids the scheduler was sent. A chat saying "boom" fails unexpectedly, one saying
    "long" streams on for a few seconds."""

    def __init__(self, cfg: GatewayConfig) -> None:
        super().__init__(cfg)
        self.sent: list[str] = []
        self.used: list[FakeScheduler] = []  # the scheduler of each generation
        self.open = self.most_open = 0

    async def chat_input(self, req: ChatCompletionRequest, request_id: str):  # type: ignore[no-untyped-def]
        if req.messages[0].content == "boom":
            raise RuntimeError("boom")
        return await super().chat_input(req, request_id)

    def generation(self, inp: GenerationInput, metrics: RequestMetrics | None = None) -> Generation:
        self.sent.append(inp.request_id)
        text = "x" * 1000 if inp.input_ids[-4:] == ids_of("long") else ANSWER
        events: list = []
        for i in range(inp.sampling.n):
            events += [*chunks_of(text, index=i, size=1), end_of(text, "length", index=i)]
        scheduler = FakeScheduler([])
        scheduler.stream = SlowStream(events)
        self.used.append(scheduler)
        return Counted(self, inp, scheduler)


class Counted(Generation):
    """A Generation that counts, on its backend, the generations streaming at once."""

    def __init__(self, backend: StreamingBackend, inp: GenerationInput, scheduler) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inp, scheduler, backend.tokenizer, RequestMetrics.disabled(), 60.0)  # type: ignore[arg-type]
        self.backend = backend

    async def outputs(self):  # type: ignore[no-untyped-def]
        b = self.backend
        b.open += 1
        b.most_open = max(b.most_open, b.open)
        try:
            async for out in super().outputs():
                yield out
        finally:
            b.open -= 1


class Lines(logging.Handler):
    """The JSON lines the gateway writes, formatted as they are emitted (as stderr gets them)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("gateway"))
        self.entries: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(self.format(record)))

    def about(self, request_id: str) -> list[dict]:
        return [e for e in self.entries if e.get("request_id") == request_id]

    def request_line(self, request_id: str) -> dict:
        (line,) = [e for e in self.about(request_id) if e["logger"].endswith(".requests")]
        return line


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler, logger = Lines(), logging.getLogger("radixserve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def make_app() -> Starlette:
    cfg = GatewayConfig(api_key=[KEY], max_request_bytes=4096, log_requests=True)
    return build_app(cfg, backend_factory=StreamingBackend)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def backend_of(client: TestClient) -> StreamingBackend:
    return client.app.state.backend  # type: ignore[attr-defined]


def sse_ids(text: str) -> set[str]:
    events = [line[6:] for line in text.splitlines() if line.startswith("data: {")]
    return {json.loads(e)["id"] for e in events}


@pytest.mark.parametrize(
    ("path", "body", "prefix"),
    [
        (CHAT, chat(), "chatcmpl-"),
        (COMPLETIONS, {"prompt": "hi"}, "cmpl-"),
        (GENERATE, {"text": "hi"}, "gen-"),
    ],
)
def test_without_the_header_the_answer_names_the_id_it_was_given(
    client: TestClient, path: str, body: dict, prefix: str
) -> None:
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    rid = response.headers["x-request-id"]
    assert rid.startswith(prefix)
    answer = response.json()
    assert (answer["meta_info"]["id"] if path == GENERATE else answer["id"]) == rid
    assert backend_of(client).sent[-1] == rid


@pytest.mark.parametrize("stream", [False, True])
def test_the_header_is_the_request_id_everywhere(
    client: TestClient, lines: Lines, stream: bool
) -> None:
    headers = {**AUTH, "X-Request-Id": "my-req-1"}
    response = client.post(CHAT, json=chat(stream=stream), headers=headers)
    assert response.status_code == 200 and response.headers["x-request-id"] == "my-req-1"
    ids = sse_ids(response.text) if stream else {response.json()["id"]}
    assert ids == {"my-req-1"}
    assert backend_of(client).sent[-1] == "my-req-1"
    line = lines.request_line("my-req-1")
    assert (line["method"], line["route"], line["status"]) == ("POST", CHAT, 200)
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (3, 3, 1)
    assert line["scheduler"] == "fake:0"  # the engine it was routed to
    assert 0 < line["ttft_ms"] <= line["latency_ms"]


def test_generate_prefers_its_rid_to_the_header(client: TestClient, lines: Lines) -> None:
    headers = {**AUTH, "X-Request-Id": "from-header"}
    response = client.post(GENERATE, json={"text": "hi", "rid": "from-body"}, headers=headers)
    assert response.headers["x-request-id"] == "from-body"
    assert response.json()["meta_info"]["id"] == "from-body"
    assert backend_of(client).sent[-1] == "from-body"
    assert lines.request_line("from-body")["status"] == 200 and not lines.about("from-header")


def test_a_rid_that_is_no_header_value_is_answered_without_the_header(client: TestClient) -> None:
    response = client.post(GENERATE, json={"text": "hi", "rid": "ĉlient-ŝ"}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert "x-request-id" not in response.headers
    assert response.json()["meta_info"]["id"] == "ĉlient-ŝ"


def test_parallel_samples_and_prompts_keep_their_internal_ids(client: TestClient) -> None:
    headers = {**AUTH, "X-Request-Id": "batch-1"}
    pair = client.post(CHAT, json=chat(n=2), headers=headers)
    assert pair.headers["x-request-id"] == "batch-1"
    assert [c["message"]["content"] for c in pair.json()["choices"]] == [ANSWER, ANSWER]
    assert backend_of(client).sent[-1] == "batch-1"  # one scheduler request, two samples
    prompts = client.post(COMPLETIONS, json={"prompt": ["a", "b"]}, headers=headers)
    assert prompts.json()["id"] == "batch-1" and len(prompts.json()["choices"]) == 2
    assert backend_of(client).sent[-2:] == ["batch-1-0", "batch-1-1"]


@pytest.mark.parametrize(
    "value",
    [b"x" * 129, b"", b"caf\xc3\xa9", b"tab\there", b"nul\x00"],
    ids=["129-chars", "empty", "non-ascii", "tab", "nul"],
)
def test_a_bad_header_is_a_400_naming_it(client: TestClient, value: bytes) -> None:
    response = client.post(CHAT, json=chat(), headers={**AUTH, "X-Request-Id": value})  # type: ignore[dict-item]
    assert response.status_code == 400
    error = response.json()["error"]
    assert "X-Request-Id" in error["message"] and error["param"] == "X-Request-Id"
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("chatcmpl-")  # a fresh id, not the bad one
    assert backend_of(client).sent == []


def test_128_printable_characters_are_accepted(client: TestClient) -> None:
    rid = "~ id with spaces " + "x" * 111
    assert len(rid) == 128
    response = client.post(
        COMPLETIONS, json={"prompt": "hi"}, headers={**AUTH, "X-Request-Id": rid}
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == rid


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{", AUTH, 400),  # malformed JSON
        (json.dumps(chat()).encode(), {}, 401),  # no API key
        (b"x" * 5000, AUTH, 413),  # past --max-request-bytes
        (json.dumps(chat("boom")).encode(), AUTH, 500),  # an unexpected error
    ],
    ids=["400", "401", "413", "500"],
)
def test_error_responses_carry_the_id_and_are_logged_under_it(
    client: TestClient, lines: Lines, body: bytes, headers: dict, status: int
) -> None:
    headers = {**headers, "X-Request-Id": f"err-{status}", "Content-Type": "application/json"}
    response = client.post(CHAT, content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["x-request-id"] == f"err-{status}"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    line = lines.request_line(f"err-{status}")
    assert line["status"] == status and line["completion_tokens"] == 0
    if status == 500:  # the traceback is logged under the request's id too
        (error,) = [e for e in lines.about("err-500") if e["level"] == "ERROR"]
        assert "RuntimeError: boom" in error["exception"]


def test_concurrent_requests_each_get_their_own_id(lines: Lines) -> None:
    app = make_app()
    app.state.backend = backend = StreamingBackend(GatewayConfig())

    async def one(client: httpx.AsyncClient, rid: str, stream: bool) -> httpx.Response:
        headers = {**AUTH, "X-Request-Id": rid}
        return await client.post(CHAT, json=chat(stream=stream), headers=headers)

    async def both() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return await asyncio.gather(one(client, "first", True), one(client, "second", False))

    first, second = asyncio.run(both())
    assert backend.most_open == 2  # the two really overlapped
    assert first.headers["x-request-id"] == "first" and sse_ids(first.text) == {"first"}
    assert second.headers["x-request-id"] == "second" and second.json()["id"] == "second"
    assert sorted(backend.sent) == ["first", "second"]
    for rid in ("first", "second"):
        assert lines.request_line(rid)["completion_tokens"] == len(ANSWER)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_is_logged_with_499_and_the_tokens_it_got(
    lines: Lines, stream: bool
) -> None:
    app = make_app()
    app.state.backend = backend = StreamingBackend(GatewayConfig())
    body = json.dumps(chat("long", stream=stream)).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        if not stream:
            await asyncio.sleep(0.05)  # a few tokens in, while the answer is being collected
            gone.set()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()  # the client reads the first event, then leaves

    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"gone-1")]
    headers += [(k.lower().encode(), v.encode()) for k, v in AUTH.items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(),
        "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 5000), "server": ("gw", 80), "state": {},
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    line = lines.request_line("gone-1")
    assert line["status"] == 499
    assert 0 < line["completion_tokens"] < 1000
    assert "gone-1" in backend.used[0].aborted  # and so aborted at the scheduler
