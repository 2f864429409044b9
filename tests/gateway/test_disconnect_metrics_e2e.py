"""A client that goes away frees its KV slots at once; /metrics agrees with the traffic sent."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.slow

LONG = {
    "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
    "max_tokens": 32,
    "ignore_eos": True,
}


def headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}"}


def wait_freed(stack: Stack, kv_used_before: int, timeout: float = 1.0) -> float:
    """Seconds until the scheduler runs nothing and holds the KV slots it held before."""
    start = time.monotonic()
    while True:
        load = stack.get_load()
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_slots_used == kv_used_before:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"still running after {timeout}s: {load}"
        time.sleep(0.01)


def test_streaming_client_that_drops_aborts_at_once(stack: Stack) -> None:
    before = stack.get_load()
    url = f"{stack.base_url}/v1/chat/completions"
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", url, json={**LONG, "stream": True}, headers=headers(stack)) as r,
    ):
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: {")
            if events == 4:  # the role chunk and three tokens
                running = stack.get_load()
                break
        r.close()
    assert running.num_running == 1 and running.kv_slots_used > before.kv_slots_used
    wait_freed(stack, before.kv_slots_used)
    assert stack.get_load().requests_finished_total == before.requests_finished_total + 1


def test_non_streaming_client_that_drops_aborts_at_once(stack: Stack) -> None:
    before = stack.get_load()
    aborted = scrape(stack).get(ABORTED, 0.0)
    url = f"{stack.base_url}/v1/chat/completions"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=LONG, headers=headers(stack), timeout=httpx.Timeout(60, read=1.0))
    wait_freed(stack, before.kv_slots_used)
    assert stack.get_load().requests_finished_total == before.requests_finished_total + 1
    assert scrape(stack)[ABORTED] == aborted + 1  # the disconnect is counted in /metrics


ABORTED = "radixserve:request_success_total{finished_reason=abort}"


def scrape(stack: Stack) -> dict[str, float]:
    """Every sample of /metrics by name (and labels)."""
    text = httpx.get(f"{stack.base_url}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                values[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return values


def test_metrics_follow_the_traffic(stack: Stack) -> None:
    before = scrape(stack)
    url = f"{stack.base_url}/v1/completions"
    usages = []
    for stream in (False, True):
        body = {"prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", url, json=body, headers=headers(stack), timeout=60) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: {")]
            usages.append(json.loads(lines[-1].removeprefix("data: "))["usage"])
        else:
            usages.append(
                httpx.post(url, json=body, headers=headers(stack), timeout=60).json()["usage"]
            )
    after = scrape(stack)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("radixserve:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("radixserve:generation_tokens_total") == 10
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("radixserve:cached_tokens_total") == cached
    assert delta("radixserve:request_success_total{finished_reason=length}") == 2
    assert delta("radixserve:e2e_request_latency_seconds_count") == 2
    assert delta("radixserve:time_to_first_token_seconds_count") == 2
    assert 0 < delta("radixserve:inter_token_latency_seconds_count") <= 8  # 4 gaps per request
    assert after["radixserve:num_requests_running"] == 0
    assert after["radixserve:num_requests_waiting"] == 0
    assert after["radixserve:kv_cache_usage_perc"] == 0
    assert 0 < after["radixserve:prefix_cache_hit_rate"] <= 1  # the second prompt was cached
    assert after["radixserve:num_retractions_total"] >= 0
    assert "radixserve:request_rejections_total" in after
