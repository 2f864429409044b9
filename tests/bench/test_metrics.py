from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.bench.metrics import Stats, peak_concurrency, percentile, summarize
from services.bench.record import RequestError, RequestRecord


def done(
    start: float, latency: float, ttft: float, itl: list[float], tokens: int, input_tokens: int = 10
) -> RequestRecord:
    return RequestRecord(
        0, 0, 0, tokens, input_tokens, start, latency, ttft, itl, tokens, tokens, "length"
    )


def failed(
    kind: str, status: int | None = None, start: float = 0.0, latency: float = 0.0
) -> RequestRecord:
    return RequestRecord(0, 0, 0, 8, 10, start, latency, error=RequestError(kind, "boom", status))


@given(
    st.lists(st.floats(0, 1e6), min_size=1, max_size=50),
    st.sampled_from([0, 1, 25, 50, 90, 99, 100]),
)
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(sorted(values), q) == pytest.approx(
        np.percentile(values, q), rel=1e-9, abs=1e-9
    )


def test_stats_in_milliseconds() -> None:
    stats = Stats.of_seconds([0.001 * i for i in range(1, 101)])
    assert stats.count == 100
    assert stats.mean == pytest.approx(50.5)
    assert stats.median == pytest.approx(50.5)
    assert stats.p99 == pytest.approx(99.01)
    assert Stats.of_seconds([]) == Stats(0, 0.0, 0.0, 0.0)


def test_summary_of_hand_built_records() -> None:
    records = [
        done(0.0, 1.0, 0.2, [0.1] * 8, tokens=9, input_tokens=100),  # tpot (1.0 - 0.2) / 8 = 0.1
        done(0.5, 2.0, 0.4, [0.2] * 8, tokens=9, input_tokens=300),  # tpot 0.2
        failed("http", 503, start=0.1, latency=0.05),
        failed("http", 503),
        failed("disconnect", 200, start=0.9, latency=0.5),
    ]
    s = summarize(records, duration_s=4.0)
    assert (s.total, s.completed, s.errors) == (5, 2, 3)
    assert s.errors_by_kind == {"http 503": 2, "disconnect": 1}
    assert s.request_throughput == pytest.approx(0.5)
    assert (s.total_input_tokens, s.total_output_tokens) == (400, 18)
    assert s.input_token_throughput == pytest.approx(100.0)
    assert s.output_token_throughput == pytest.approx(4.5)
    assert s.total_token_throughput == pytest.approx(104.5)
    assert s.ttft_ms == Stats(2, pytest.approx(300.0), pytest.approx(300.0), pytest.approx(398.0))
    assert s.itl_ms.count == 16 and s.itl_ms.mean == pytest.approx(150.0)
    assert s.itl_ms.median == pytest.approx(150.0) and s.itl_ms.p99 == pytest.approx(200.0)
    assert s.tpot_ms.mean == pytest.approx(150.0)
    assert s.e2e_latency_ms.mean == pytest.approx(1500.0)
    assert s.mean_concurrency == pytest.approx((1.0 + 2.0 + 0.05 + 0.5) / 4.0)
    assert s.peak_concurrency == 3  # in [0.9, 1.0): both completed requests and the disconnect
    assert (s.total_cached_tokens, s.cached_token_ratio) == (None, None)  # none reported
    records[0].server_cached_tokens, records[1].server_cached_tokens = 40, 60
    cached = summarize(records, duration_s=4.0)
    assert (cached.total_cached_tokens, cached.cached_token_ratio) == (100, 0.25)


def test_errors_only_summary_has_empty_stats() -> None:
    s = summarize([failed("cancelled"), failed("timeout")], duration_s=1.0)
    assert (s.completed, s.errors, s.request_throughput) == (0, 2, 0.0)
    assert s.ttft_ms.count == s.itl_ms.count == s.e2e_latency_ms.count == 0
    assert math.isfinite(s.e2e_latency_ms.mean)


def test_peak_concurrency_frees_before_it_takes() -> None:
    back_to_back = [
        done(0.0, 1.0, 0.1, [], 1),
        done(1.0, 1.0, 0.1, [], 1),
        done(2.0, 1.0, 0.1, [], 1),
    ]
    assert peak_concurrency(back_to_back) == 1
    nested = [done(0.0, 3.0, 0.1, [], 1), done(0.5, 1.0, 0.1, [], 1), done(1.0, 1.0, 0.1, [], 1)]
    assert peak_concurrency(nested) == 3
    assert peak_concurrency([]) == 0
