"""Prometheus metrics of the gateway (names of DESIGN §7), plus the schedulers' load at scrape time.

The gateway measures latency and token counts per request itself. Queue depth, KV usage, cache
hit rate and retractions are the schedulers' own numbers, copied (summed over the replicas) from
their latest GetLoad when /metrics is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gateway.events import Usage
from services.gateway.router import SchedulerLoad

# fmt: off
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
# fmt: on


class SchedulerLoadCollector(Collector):
    """Gauges (and the retraction counter) from the schedulers' latest load snapshots."""

    def __init__(self, loads: Callable[[], list[SchedulerLoad]]) -> None:
        self._loads = loads

    def collect(self) -> Iterator[Metric]:
        loads = self._loads()
        kv_total = sum(x.kv_slots_total for x in loads)
        prompt = sum(x.prompt_tokens_total for x in loads)
        yield _gauge(
            "num_requests_running",
            "Samples running on the schedulers",
            sum(x.num_running for x in loads),
        )
        yield _gauge(
            "num_requests_waiting",
            "Samples waiting in the schedulers' queues",
            sum(x.num_waiting for x in loads),
        )
        used = sum(x.kv_slots_used for x in loads)
        yield _gauge(
            "kv_cache_usage_perc",
            "Fraction of KV slots held by running samples",
            used / kv_total if kv_total else 0.0,
        )
        cached = sum(x.cached_tokens_total for x in loads)
        yield _gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens taken from the prefix cache / all prompt tokens",
            cached / prompt if prompt else 0.0,
        )
        yield CounterMetricFamily(
            "radixserve:num_retractions",
            "Samples pushed back to the queue because decode ran out of KV slots",
            value=sum(x.num_retractions_total for x in loads),
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"radixserve:{name}", doc, value=value)


class GatewayMetrics:
    """The gateway's registry; one RequestMetrics per request feeds it."""

    def __init__(self, loads: Callable[[], list[SchedulerLoad]]) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "radixserve:time_to_first_token_seconds",
            "Time to the first output token",
            registry=r,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "radixserve:inter_token_latency_seconds",
            "Time between output tokens of a sample",
            registry=r,
            buckets=ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "radixserve:e2e_request_latency_seconds",
            "Arrival to last token of a request",
            registry=r,
            buckets=E2E_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "radixserve:prompt_tokens_total", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "radixserve:generation_tokens_total",
            "Tokens generated for finished requests",
            registry=r,
        )
        self.cached_tokens = Counter(
            "radixserve:cached_tokens_total",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.success = Counter(
            "radixserve:request_success_total",
            "Samples finished, by reason",
            ["finished_reason"],
            registry=r,
        )
        self.rejections = Counter(
            "radixserve:request_rejections_total",
            "Requests refused because a queue was full",
            registry=r,
        )
        r.register(SchedulerLoadCollector(loads))

    def request(self) -> RequestMetrics:
        return RequestMetrics(self, time.monotonic())

    def rejected(self) -> None:
        self.rejections.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Latency and token accounting of one request (of one prompt, for batched completions)."""

    def __init__(self, metrics: GatewayMetrics | None, arrived: float) -> None:
        self.m, self.arrived = metrics, arrived  # m None: not recorded (internal probes)
        self.first_token_at: float | None = None  # time.monotonic() of the first output token

    @classmethod
    def disabled(cls) -> RequestMetrics:
        return cls(None, time.monotonic())

    def tokens(self, now: float, previous: float | None, count: int) -> None:
        """`count` tokens of one sample arrived at `now`; its previous ones at `previous`."""
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        if self.m is None:
            return
        if first:
            self.m.ttft.observe(now - self.arrived)
        elif previous is not None:
            for _ in range(count):
                self.m.itl.observe((now - previous) / count)

    def finished(self, usage: Usage, reasons: list[str]) -> None:
        if self.m is None:
            return
        self.m.e2e.observe(time.monotonic() - self.arrived)
        self.m.prompt_tokens.inc(usage.prompt_tokens)
        self.m.generation_tokens.inc(usage.completion_tokens)
        self.m.cached_tokens.inc(usage.cached_tokens)
        for reason in reasons:
            self.m.success.labels(finished_reason=reason).inc()
