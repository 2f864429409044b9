from __future__ import annotations

import asyncio
import statistics

import pytest

from services.bench.client import BenchClient, ClientConfig, api_url, first_model, make_http
from services.bench.datasets import Request
from services.bench.record import RequestRecord
from services.bench.tokens import Message, TokenCounter
from tests.bench.fake_server import FIRST_DELAY_S, GAP_S, WORD, FakeServer
from tests.procs import free_port

# the machine is shared: timings may run late, never early
SLACK_S = 0.25


def send(
    url: str,
    counter: TokenCounter,
    model: str,
    endpoint: str,
    max_tokens: int,
    **kw: object,
) -> RequestRecord:
    async def go() -> RequestRecord:
        async with make_http(None) as http:
            config = ClientConfig(url, model, endpoint, **kw)  # type: ignore[arg-type]
            return await BenchClient(config, counter, http).send(request)

    request = Request((Message("system", "be brief"), Message("user", "say hello")), max_tokens)
    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_is_timed_and_recounted(
    fake_server: FakeServer, counter: TokenCounter, endpoint: str
) -> None:
    record = send(fake_server.url, counter, "ok", endpoint, max_tokens=8)
    assert record.ok, record.error
    assert FIRST_DELAY_S <= record.ttft_s < FIRST_DELAY_S + SLACK_S
    assert len(record.itl_s) == 7
    assert statistics.mean(record.itl_s) == pytest.approx(GAP_S, abs=0.03)
    assert sum(record.itl_s) >= 7 * GAP_S - 0.01
    assert (
        record.ttft_s + sum(record.itl_s)
        <= record.latency_s
        < record.ttft_s + sum(record.itl_s) + SLACK_S
    )
    assert record.text == WORD * 8
    assert record.output_tokens == counter.count_text(WORD * 8) == 8
    assert record.server_output_tokens == 8 and record.finish_reason == "length"
    assert record.server_cached_tokens == 3  # usage.prompt_tokens_details.cached_tokens
    request = Request((Message("system", "be brief"), Message("user", "say hello")), 8)
    expected_input = (
        counter.count_messages(request.messages)
        if endpoint == "chat"
        else counter.count_prompt(request.prompt())
    )
    assert record.input_tokens == expected_input > 0


def test_request_body(fake_server: FakeServer, counter: TokenCounter) -> None:
    send(fake_server.url, counter, "ok", "chat", max_tokens=2, api_key="k")
    body = fake_server.bodies[-1]
    assert fake_server.auth[-1] == "Bearer k"
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "say hello"},
    ]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["ignore_eos"]) == (2, 0.0, True)
    send(
        fake_server.url,
        counter,
        "ok",
        "completions",
        max_tokens=2,
        ignore_eos=False,
        temperature=0.7,
    )
    body = fake_server.bodies[-1]
    assert body["prompt"] == "be brief\n\nsay hello" and "ignore_eos" not in body
    assert body["temperature"] == 0.7


def test_a_chunk_of_several_tokens_is_one_gap(
    fake_server: FakeServer, counter: TokenCounter
) -> None:
    record = send(fake_server.url, counter, "pairs", "chat", max_tokens=8)
    assert record.ok and len(record.itl_s) == 3
    assert record.output_tokens == 8


def test_http_503_is_an_error_with_its_status(
    fake_server: FakeServer, counter: TokenCounter
) -> None:
    record = send(fake_server.url, counter, "busy", "chat", max_tokens=4)
    assert record.error is not None
    assert (record.error.kind, record.error.status, record.error.message) == (
        "http",
        503,
        "server overloaded",
    )
    assert record.ttft_s is None and record.output_tokens == 0


def test_mid_stream_disconnect_is_an_error(fake_server: FakeServer, counter: TokenCounter) -> None:
    record = send(fake_server.url, counter, "drop", "completions", max_tokens=8)
    assert record.error is not None and record.error.kind == "disconnect"
    assert record.ttft_s is not None, "the first tokens did arrive"


def test_error_event_and_missing_done_are_errors(
    fake_server: FakeServer, counter: TokenCounter
) -> None:
    record = send(fake_server.url, counter, "error-event", "chat", max_tokens=4)
    assert record.error is not None
    assert (record.error.kind, record.error.message) == ("server", "out of KV slots")
    record = send(fake_server.url, counter, "no-done", "chat", max_tokens=2)
    assert record.error is not None and record.error.kind == "incomplete"


def test_refused_connection_is_an_error(counter: TokenCounter) -> None:
    record = send(f"http://127.0.0.1:{free_port()}", counter, "ok", "chat", max_tokens=2)
    assert record.error is not None and record.error.kind == "connect"


def test_models_and_urls(fake_server: FakeServer) -> None:
    async def go() -> str:
        async with make_http(None) as http:
            return await first_model(http, fake_server.url + "/v1/", None)

    assert asyncio.run(go()) == "ok"
    assert (
        api_url("http://h:1", "/models")
        == api_url("http://h:1/v1/", "/models")
        == "http://h:1/v1/models"
    )
