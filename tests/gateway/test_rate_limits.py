"""Per-key limits (--api-key-file): requests and tokens per minute, 429 with Retry-After."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from services.gateway.app import build_app
from services.gateway.config import GatewayConfig
from services.gateway.errors import RateLimited
from services.gateway.rate_limits import KeyLimit, RateLimiter, load_keys_file
from tests.gateway.test_hostile import FakeBackend

COMPLETIONS = "/v1/completions"
BODY = {"prompt": "hi", "max_tokens": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_slide_with_the_window() -> None:
    clock = Clock()
    limiter = RateLimiter([KeyLimit("k", "team-a", rpm=2)], clock)
    limiter.admit("k")
    clock.now += 10
    limiter.admit("k")
    clock.now += 5
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k")
    assert refused.value.type == "requests" and refused.value.status == 429
    assert refused.value.retry_after_s == 45  # the first request leaves the window then
    assert "team-a" in refused.value.message and "limit 2" in refused.value.message
    clock.now += 45
    limiter.admit("k")  # one slot free again
    limiter.admit("unlimited-key")  # keys without limits always pass


def test_tokens_per_minute_count_ended_requests() -> None:
    clock = Clock()
    limiter = RateLimiter([KeyLimit("k", "team-b", tpm=100)], clock)
    limiter.admit("k")
    limiter.add_tokens("k", 60)
    clock.now += 20
    limiter.admit("k")  # 60 < 100
    limiter.add_tokens("k", 50)
    with pytest.raises(RateLimited) as refused:
        limiter.admit("k")
    assert refused.value.type == "tokens" and refused.value.retry_after_s == 40
    clock.now += 40  # the 60-token charge left the window: 50 remain
    limiter.admit("k")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{", "Expecting"),
        ('{"keys": {}}', "expected"),
        ('{"keys": [{"name": "x"}]}', "non-empty string 'key'"),
        ('{"keys": [{"key": "a", "rpm": 0}]}', "'rpm' must be a positive integer"),
        ('{"keys": [{"key": "a", "tpm": true}]}', "'tpm' must be a positive integer"),
        ('{"keys": [{"key": "a", "rpm": 1.5}]}', "'rpm' must be a positive integer"),
        ('{"keys": [{"key": "a"}, {"key": "a"}]}', "appears twice"),
        ('{"keys": [{"key": "a", "burst": 3}]}', "unknown field(s) ['burst']"),
        ('{"keys": [{"key": "a", "name": 3}]}', "'name' must be a string"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_problem(
    tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="--api-key-file") as bad:
        load_keys_file(path)
    assert says in str(bad.value)
    with pytest.raises(ValueError):
        GatewayConfig(api_key_file=str(path))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    keys = {
        "keys": [
            {"key": "two-a-minute", "name": "team-a", "rpm": 2},
            {"key": "few-tokens", "name": "team-b", "tpm": 5},
            {"key": "free"},
        ]
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    cfg = GatewayConfig(api_key=["plain"], api_key_file=str(path))
    app = build_app(cfg, backend_factory=FakeBackend)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, key: str):  # type: ignore[no-untyped-def]
    return client.post(COMPLETIONS, json=BODY, headers={"Authorization": f"Bearer {key}"})


def test_past_its_requests_per_minute_a_key_gets_429_with_retry_after(client: TestClient) -> None:
    assert [post(client, "two-a-minute").status_code for _ in range(2)] == [200, 200]
    refused = post(client, "two-a-minute")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "team-a" in error["message"] and error["param"] is None
    # Other keys, limited or not, and --api-key keys carry on.
    assert [post(client, k).status_code for k in ("free", "plain", "few-tokens")] == [200] * 3
    assert client.post("/tokenize", json={"prompt": "a"}, headers={
        "Authorization": "Bearer two-a-minute"}).status_code == 429  # fmt: skip


def test_past_its_tokens_per_minute_a_key_gets_429(client: TestClient) -> None:
    first = post(client, "few-tokens")
    assert first.status_code == 200
    used = first.json()["usage"]
    assert used["prompt_tokens"] + used["completion_tokens"] >= 5
    refused = post(client, "few-tokens")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert "retry-after" in refused.headers


def test_keys_of_the_file_are_api_keys(client: TestClient) -> None:
    assert post(client, "free").status_code == 200
    assert post(client, "unknown").status_code == 401
