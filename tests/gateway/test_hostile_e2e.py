"""A sample of the hostile table through the real services: each a clean 4xx, and afterwards the
services are still up and a normal request still works."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.gateway.conftest import Stack
from tests.gateway.hostile import Case, cases, check_answer

pytestmark = pytest.mark.slow

# The cases that gave 500 before, and an even spread of the rest (about 30 in all).
MUST = {
    "chat-surrogate-model",
    "chat-surrogate-name",
    "generate-surrogate-rid",
    "chat-deep-list-body",
    "completions-top_k-above",
    "completions-min_tokens-huge",
    "prompt-id-2^31",
    "prompt-id-2^64",
    "input-ids-2^31",
    "chat-n-huge",
    "logit-bias-key-0",
    "logit-bias-key-1",
    "chat-repetition_penalty-above",
    "chat-huge-content",
    "completions-too-large",
}
ALL = cases()
SAMPLE = [c for c in ALL if c.id in MUST] + [c for c in ALL[:: len(ALL) // 15] if c.id not in MUST]


def send(stack: Stack, case: Case) -> httpx.Response:
    headers = {"Content-Type": case.content_type, "Authorization": f"Bearer {stack.api_key}"}
    url = stack.base_url + case.path
    return httpx.request(case.method, url, content=case.body, headers=headers, timeout=60)


def test_hostile_sample_through_the_real_services(stack: Stack) -> None:
    assert {c.id for c in SAMPLE} >= MUST and len(SAMPLE) >= 25
    for case in SAMPLE:
        response = send(stack, case)
        check_answer(case, response.status_code, response.headers, response.content)
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ok = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{stack.base_url}/ready", timeout=10).status_code == 200
    assert stack.get_load().num_running == 0


def test_ten_megabytes_are_refused_before_they_are_sent(stack: Stack) -> None:
    """Headers and the first 64 KiB of a 10 MB body: the 413 comes back without the rest."""
    url = urlparse(stack.base_url)
    head = (
        "POST /v1/completions HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {stack.api_key}\r\nContent-Length: 10000000\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        started = time.perf_counter()
        sock.sendall(head + b'{"prompt": "' + b"x" * 65536)
        answer = sock.recv(65536)
        elapsed = time.perf_counter() - started
        while b"request_too_large" not in answer and (more := sock.recv(65536)):
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer
    assert elapsed < 0.1, elapsed
    health = httpx.get(f"{stack.base_url}/health", timeout=10)
    assert health.status_code == 200
