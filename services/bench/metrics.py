"""The summary of a run, from its request records alone (pure functions, no server needed)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from services.bench.record import RequestRecord


@dataclass(frozen=True)
class Stats:
    """A latency distribution in milliseconds; all zero when `count` is 0."""

    count: int
    mean: float
    median: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Stats:
        if not values:
            return cls(0, 0.0, 0.0, 0.0)
        ms = sorted(v * 1000.0 for v in values)
        return cls(len(ms), math.fsum(ms) / len(ms), percentile(ms, 50), percentile(ms, 99))


@dataclass(frozen=True)
class Summary:
    total: int  # requests planned
    completed: int
    errors: int
    errors_by_kind: dict[str, int]  # RequestError.kind (http errors as "http <status>") → count
    duration_s: float  # the run's wall time
    request_throughput: float  # completed requests / s
    input_token_throughput: float  # prompt tokens of completed requests / s
    output_token_throughput: float  # generated tokens of completed requests / s
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    # Prompt tokens the server reported served from its prefix cache (usage's cached_tokens),
    # and their share of the prompt tokens; None when the server reports none.
    total_cached_tokens: int | None
    cached_token_ratio: float | None
    ttft_ms: Stats
    itl_ms: Stats  # gaps between text-bearing chunks, pooled over requests
    tpot_ms: Stats  # per request: (latency - TTFT) / (output tokens - 1)
    e2e_latency_ms: Stats
    mean_concurrency: float  # requests in flight on average: sum of latencies / duration
    peak_concurrency: int  # most requests in flight at one instant


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted values, interpolating linearly between ranks."""
    assert sorted_values, "percentile of nothing"
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def tpot_s(record: RequestRecord) -> float | None:
    if record.ttft_s is None or record.output_tokens < 2:
        return None
    return (record.latency_s - record.ttft_s) / (record.output_tokens - 1)


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most intervals [start, start + latency) overlapping at once (an end frees its slot before
    a start at the same instant takes one)."""
    events = sorted(
        [(r.start_s, 1) for r in records if r.latency_s > 0]
        + [(r.start_s + r.latency_s, -1) for r in records if r.latency_s > 0]
    )
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def error_label(record: RequestRecord) -> str:
    assert record.error is not None
    if record.error.kind == "http":
        return f"http {record.error.status}"
    return record.error.kind


def summarize(records: Sequence[RequestRecord], duration_s: float) -> Summary:
    assert duration_s > 0, "a run takes time"
    done = [r for r in records if r.ok]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    reported = [r.server_cached_tokens for r in done if r.server_cached_tokens is not None]
    cached = sum(reported) if reported else None
    return Summary(
        total=len(records),
        completed=len(done),
        errors=len(records) - len(done),
        errors_by_kind=dict(Counter(error_label(r) for r in records if not r.ok)),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        input_token_throughput=input_tokens / duration_s,
        output_token_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_cached_tokens=cached,
        cached_token_ratio=cached / input_tokens if cached is not None and input_tokens else None,
        ttft_ms=Stats.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=Stats.of_seconds([gap for r in done for gap in r.itl_s]),
        tpot_ms=Stats.of_seconds([t for t in map(tpot_s, done) if t is not None]),
        e2e_latency_ms=Stats.of_seconds([r.latency_s for r in done]),
        mean_concurrency=math.fsum(r.latency_s for r in records) / duration_s,
        peak_concurrency=peak_concurrency(records),
    )
