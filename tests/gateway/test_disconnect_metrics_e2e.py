"""A client that goes away frees its KV slots at once; /metrics agrees with the traffic sent."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests import procs
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
            # the role chunk and the first token's (later chunks carry up to 8 tokens each: the
            # CPU's --num-continuous-decode-steps), so most of the 32 tokens are still to come
            if events == 2:
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
    # long enough to outlast the 1 s read timeout on any CPU (one float32 stream of the default
    # model decodes 32 tokens within it on an AVX-512 host); the abort ends it at once
    body = {**LONG, "max_tokens": 1024}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=headers(stack), timeout=httpx.Timeout(60, read=1.0))
    wait_freed(stack, before.kv_slots_used)
    assert stack.get_load().requests_finished_total == before.requests_finished_total + 1
    assert scrape(stack)[ABORTED] == aborted + 1  # the disconnect is counted in /metrics


ABORTED = "radixserve:request_success_total{finished_reason=abort}"


def scrape(stack: Stack) -> dict[str, float]:
    """The gateway's /metrics (every radixserve series labelled with the served model)."""
    return procs.scrape(f"{stack.base_url}/metrics")


def test_metrics_follow_the_traffic(stack: Stack) -> None:
    before, engine_before = scrape(stack), procs.scrape(stack.scheduler_metrics)
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
    engine_after = procs.scrape(stack.scheduler_metrics)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    def engine_delta(name: str) -> float:
        return engine_after[name] - engine_before.get(name, 0.0)

    # The gateway: what it measured itself, per request.
    assert delta("radixserve:request_success_total{finished_reason=length}") == 2
    assert delta("radixserve:e2e_request_latency_seconds_count") == 2
    assert delta("radixserve:time_to_first_token_seconds_count") == 2
    assert 0 < delta("radixserve:inter_token_latency_seconds_count") <= 8  # 4 gaps per request
    assert delta("http_requests_total{handler=/v1/completions,method=POST,status=2xx}") == 2
    assert "radixserve:request_rejections_total" in after
    assert "process_resident_memory_bytes" in after
    # The engine's numbers are the scheduler's own, not re-exported by the gateway.
    assert not any(k.startswith("radixserve:num_requests_waiting") for k in after)
    prompt = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert engine_delta("radixserve:prompt_tokens_total") == prompt
    assert engine_delta("radixserve:generation_tokens_total") == 10
    assert engine_delta("radixserve:prefix_cache_queries_total") == prompt
    assert engine_delta("radixserve:prefix_cache_hits_total") == cached > 0  # the 2nd was cached
    assert engine_delta("radixserve:request_prompt_tokens_sum") == prompt
    assert engine_delta("radixserve:request_generation_tokens_sum") == 10
    for stage in ("queue", "prefill", "decode", "inference"):
        assert engine_delta(f"radixserve:request_{stage}_time_seconds_count") == 2, stage
    # Each request: a prefill step, then a step of 4 decode iterations (the CPU's default
    # --num-continuous-decode-steps, 8, capped at the 4 tokens left to sample), which the
    # histogram counts once. The step in flight when the test before aborted its request may
    # answer after `engine_before`: up to 8 positions more (EndDecode ends it after the
    # iteration it was computing).
    assert engine_delta("radixserve:iteration_tokens_total_count") >= 2 * 2
    computed = engine_delta("radixserve:iteration_tokens_total_sum")
    assert prompt - cached + 2 * 4 <= computed <= prompt - cached + 2 * 4 + 8
    assert engine_after["radixserve:num_preemptions_total"] >= 0
    assert engine_after["radixserve:num_requests_running"] == 0
    assert engine_after["radixserve:num_requests_waiting"] == 0
    assert engine_after["radixserve:kv_cache_usage_perc"] == 0
