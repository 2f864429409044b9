"""A sample of the hostile table through the real services: each a clean 4xx, and afterwards the
services are still up and a normal request still works."""

from __future__ import annotations

import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.gateway.conftest import Stack
from tests.gateway.hostile import Case, cases, check_answer

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
INVALID_EXAMPLES = 150

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


def test_schemathesis_invalid_requests_through_the_real_services(stack: Stack) -> None:
    """Requests that break `/openapi.json`, as schemathesis generates them, against the real
    services: every one refused with an OpenAI-shaped 4xx, none reaches the model."""
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    seen: collections.Counter[int] = collections.Counter()

    @given(case=schema.as_strategy(GenerationMode.NEGATIVE))
    @settings(
        max_examples=INVALID_EXAMPLES,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def refused(case: schemathesis.Case) -> None:
        response = case.call(headers=headers, timeout=60)
        seen[response.status_code] += 1
        assert 400 <= response.status_code < 500, (case.as_curl_command(), response.text)
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}, error

    refused()
    assert sum(seen.values()) >= INVALID_EXAMPLES // 2, seen
    assert stack.get_load().num_running == 0
    assert httpx.get(f"{stack.base_url}/ready", timeout=10).status_code == 200


def _small_request_s(stack: Stack) -> float:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    body = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    started = time.perf_counter()
    response = httpx.post(
        f"{stack.base_url}/v1/completions", json=body, headers=headers, timeout=30
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed


def test_ten_megabyte_bodies_leave_small_requests_as_fast_as_idle(stack: Stack) -> None:
    """Two clients pushing 10 MB bodies without pause (one with Content-Length, one chunked;
    tests/gateway/push_bodies.py, at the lowest CPU priority so the clients do not take the
    services' cores): each gets its 413, and a small request meanwhile takes at most twice its
    idle time (medians of 7, bounded in count and time)."""
    idle = statistics.median(_small_request_s(stack) for _ in range(7))
    pushers = subprocess.Popen(
        [sys.executable, "-m", "tests.gateway.push_bodies", stack.base_url, stack.api_key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lambda: os.nice(19),
    )
    try:
        time.sleep(1.0)  # the interpreter starts, then both push
        busy = statistics.median(_small_request_s(stack) for _ in range(7))
    finally:
        out, _ = pushers.communicate(input="", timeout=90)
    answers = json.loads(out)
    print(f"small request: {idle * 1000:.0f} ms idle, {busy * 1000:.0f} ms under 10 MB bodies")
    assert set(answers) == {"HTTP/1.1 413 Request Entity Too Large"}, answers
    assert answers["HTTP/1.1 413 Request Entity Too Large"] >= 4, answers
    assert busy <= 2 * idle, (busy, idle)
