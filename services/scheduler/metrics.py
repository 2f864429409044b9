"""The scheduler's numbers: cumulative counters, the load snapshot a router reads (GetLoad), and
its Prometheus series (served at its --metrics-port; docs/metrics.md).

Gauges and counters are read from the scheduler when scraped (a collector, nothing per token);
the per-request histograms are observed when a sample reaches each stage of its life, the
iteration histogram once per step. Names and meanings follow vLLM's (`vllm:` becomes
`radixserve:`), with the served model name as the `model_name` label.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common.metrics import MODEL_NAME, PREFIX, model_histogram
from services.scheduler.cache import CacheStats
from services.scheduler.request import SampleTimes

# fmt: off
TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # vLLM's request_*_time_seconds
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)  # 1-2-5 up to a long context
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # vLLM's, from its cudagraph sizes
# fmt: on


@dataclass
class Counters:
    """Monotonic since start; only the scheduler loop and its API methods (one thread) write them."""

    prompt_tokens: int = 0  # prompt tokens of samples at first admission
    cached_tokens: int = 0  # of those, taken from the prefix cache
    generation_tokens: int = 0
    retractions: int = 0
    rejections: int = 0  # Generate refused because the queue was full
    finished: int = 0
    steps: int = 0
    computed_tokens: int = 0  # tokens the executor computed, from step results
    integrity_checks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class Load:
    num_running: int
    num_waiting: int
    kv: CacheStats
    new_token_ratio: float
    max_running_requests: int
    max_queued_requests: int
    counters: Counters

    @property
    def kv_usage(self) -> float:
        return self.kv.usage


class SchedulerMetrics:
    """The scheduler's series in `registry`. `bind` names the model once the executor's Info is
    known; until then (and while no executor is connected) the collector reports nothing."""

    def __init__(self, registry: CollectorRegistry, load: Callable[[], Load | None]) -> None:
        self.model_name: str | None = None

        self._queue = model_histogram(
            registry,
            "request_queue_time_seconds",
            "Arrival to first admission of a sample",
            TIME_BUCKETS,
        )
        self._prefill = model_histogram(
            registry,
            "request_prefill_time_seconds",
            "First admission to first output token of a sample",
            TIME_BUCKETS,
        )
        self._decode = model_histogram(
            registry,
            "request_decode_time_seconds",
            "First output token to the end of a sample",
            TIME_BUCKETS,
        )
        self._inference = model_histogram(
            registry,
            "request_inference_time_seconds",
            "First admission to the end of a sample (prefill and decode)",
            TIME_BUCKETS,
        )
        self._prompt = model_histogram(
            registry, "request_prompt_tokens", "Prompt tokens of each ended sample", TOKEN_BUCKETS
        )
        self._generation = model_histogram(
            registry,
            "request_generation_tokens",
            "Tokens generated for each ended sample",
            TOKEN_BUCKETS,
        )
        self._iteration = model_histogram(
            registry, "iteration_tokens_total", "Tokens computed per engine step", ITERATION_BUCKETS
        )
        registry.register(_LoadCollector(self, load))

    def bind(self, model_name: str) -> None:
        self.model_name = model_name
        (
            self.queue,
            self.prefill,
            self.decode,
            self.inference,
            self.prompt,
            self.generation,
            self.iteration,
        ) = (
            h.labels(model_name)
            for h in (
                self._queue,
                self._prefill,
                self._decode,
                self._inference,
                self._prompt,
                self._generation,
                self._iteration,
            )
        )

    def admitted(self, times: SampleTimes) -> None:
        """The sample got its first row."""
        times.admitted = time.monotonic()
        self.queue.observe(times.admitted - times.arrived)

    def first_token(self, times: SampleTimes) -> None:
        times.first_token = time.monotonic()
        if times.admitted is not None:
            self.prefill.observe(times.first_token - times.admitted)

    def ended(self, times: SampleTimes, prompt_tokens: int, output_tokens: int) -> None:
        """The sample finished or failed; samples never admitted are not observed (as vLLM)."""
        if times.admitted is None:
            return
        now = time.monotonic()
        self.inference.observe(now - times.admitted)
        if times.first_token is not None:
            self.decode.observe(now - times.first_token)
        self.prompt.observe(prompt_tokens)
        self.generation.observe(output_tokens)


class _LoadCollector(Collector):
    """Gauges and counters from the scheduler's live state, read at scrape time (from the HTTP
    server's thread: plain integer reads, a consistent-enough snapshot)."""

    def __init__(self, metrics: SchedulerMetrics, load: Callable[[], Load | None]) -> None:
        self._metrics, self._load = metrics, load

    def collect(self) -> Iterator[Metric]:
        model, load = self._metrics.model_name, self._load()
        if model is None or load is None:
            return
        c = load.counters
        gauges = [
            ("num_requests_running", "Samples running (prefilling or decoding)", load.num_running),
            ("num_requests_waiting", "Samples waiting in the queue", load.num_waiting),
            ("kv_cache_usage_perc", "Fraction (0-1) of KV slots in use", load.kv_usage),
        ]
        counters = [
            ("prompt_tokens", "Prompt tokens of admitted samples", c.prompt_tokens),
            ("generation_tokens", "Tokens generated", c.generation_tokens),
            (
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                c.prompt_tokens,
            ),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache", c.cached_tokens),
            (
                "num_preemptions",
                "Samples retracted to the queue (decode ran out of KV slots)",
                c.retractions,
            ),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=[MODEL_NAME])
            family.add_metric([model], value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=[MODEL_NAME])
            family.add_metric([model], value)
            yield family
