"""Every error case through the real services: status code and OpenAI error body."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway.conftest import API_KEYS, MAX_QUEUED, Stack, gateway_args
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
KEY = {"Authorization": f"Bearer {API_KEYS[0]}"}
WRONG_KEY = {"Authorization": "Bearer nope"}
BASIC = {"Authorization": f"Basic {API_KEYS[0]}"}

# id, path, body (None: GET; bytes: raw; else JSON), headers, status, code, param, message part
# fmt: off
CASES = [
    ("malformed-json", "/v1/chat/completions", b'{"messages": [', KEY, 400, None, None, "malformed JSON"),
    ("invalid-field", "/v1/chat/completions", {**CHAT, "temperature": 5}, KEY, 400, None, "temperature", "less than or equal to 2"),
    ("missing-field", "/v1/completions", {"max_tokens": 2}, KEY, 400, None, "prompt", "required"),
    ("bad-content", "/v1/chat/completions", {"messages": [{"role": "user", "content": 1}]}, KEY, 400, None, "messages[0].content", "string"),
    ("unknown-model", "/v1/chat/completions", {**CHAT, "model": "gpt-9"}, KEY, 404, "model_not_found", "model", "gpt-9"),
    ("unknown-model-id", "/v1/models/gpt-9", None, KEY, 404, "model_not_found", "model", "gpt-9"),
    ("over-the-context", "/v1/completions", {"prompt": "Hello", "max_tokens": 2048}, KEY, 400, "context_length_exceeded", "prompt", "2048 tokens"),
    ("no-api-key", "/v1/chat/completions", CHAT, {}, 401, "invalid_api_key", None, "Missing API key"),
    ("wrong-api-key", "/v1/models", None, WRONG_KEY, 401, "invalid_api_key", None, "Incorrect API key"),
    ("not-bearer", "/v1/models", None, BASIC, 401, "invalid_api_key", None, "Incorrect API key"),
    ("rejected-field", "/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, KEY, 400, None, "audio", "audio output is not supported"),
    ("tool-choice-without-tools", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, KEY, 400, None, "tool_choice", "needs 'tools'"),
    ("queue-full", "/v1/chat/completions", {**CHAT, "n": MAX_QUEUED + 1}, KEY, 503, "queue_full", None, "overloaded"),
    ("unknown-route", "/v1/embeddings", {"input": "x"}, KEY, 404, "unknown_url", None, "Not Found"),
    ("wrong-method", "/v1/completions", None, KEY, 405, None, None, "Method Not Allowed"),
]
# fmt: on


def call(base_url: str, path: str, body: object, headers: dict) -> httpx.Response:
    if body is None:
        return httpx.get(base_url + path, headers=headers, timeout=60)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(base_url + path, content=content, headers=headers, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code", "param", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_error_cases(
    stack: Stack,
    path: str,
    body: object,
    headers: dict,
    status: int,
    code: str | None,
    param: str | None,
    message: str,
) -> None:
    response = call(stack.base_url, path, body, headers)
    error = assert_openai_error(response, status, code)
    assert error["param"] == param and message in error["message"]
    if code == "queue_full":
        assert response.headers["Retry-After"] == "1"


def test_context_error_names_both_numbers(stack: Stack) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2040}
    response = call(stack.base_url, "/v1/chat/completions", body, KEY)
    message = assert_openai_error(response, 400, "context_length_exceeded")["message"]
    prompt_tokens = int(message.split("(")[1].split(" ")[0])
    assert f"requested {prompt_tokens + 2040} tokens" in message
    assert f"({prompt_tokens} in the messages, 2040 in the completion)" in message


def test_second_api_key_works(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {API_KEYS[1]}"}
    assert httpx.get(f"{stack.base_url}/v1/models", headers=headers).status_code == 200


@pytest.fixture(scope="module")
def orphan_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose tokenizer and scheduler addresses have nothing behind them."""
    port = free_port()
    log = tmp_path_factory.mktemp("orphan") / "gateway.log"
    with ServiceProcess(gateway_args(port, free_port(), free_port()), log) as proc:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
        assert proc.stop() == 0, proc.output()[-2000:]


def test_downstream_unavailable(orphan_gateway: str) -> None:
    assert httpx.get(f"{orphan_gateway}/health").json() == {"status": "ok"}
    error = assert_openai_error(httpx.get(f"{orphan_gateway}/ready"), 503, "service_unavailable")
    assert "not ready" in error["message"] and "scheduler" in error["message"]
    chat = call(orphan_gateway, "/v1/chat/completions", CHAT, {})
    assert_openai_error(chat, 503, "service_unavailable")
    generate = httpx.get(f"{orphan_gateway}/health_generate")
    assert_openai_error(generate, 503, "service_unavailable")
