"""The gateway's Prometheus series: what it measures itself, per request, as its clients see it.

Latency (time to first token, between tokens, end to end) and finished requests by reason, under
vLLM's names (`vllm:` becomes `radixserve:`) with the served model's `model_name` label; 503s
refused for a full queue; http_requests_total and http_request_duration_seconds for every route
(prometheus-fastapi-instrumentator's names and labels, as vLLM serves them); process and Python
series. Queue depth, KV usage, token counts and the prefix cache are the schedulers' own numbers,
served by each scheduler (docs/metrics.md).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import MODEL_NAME, PREFIX, model_histogram, service_registry
from services.gateway.events import Usage

# fmt: off
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# fmt: on
FINISH_REASONS = ("stop", "length", "abort")
UNMATCHED = "none"  # the handler label of a path no route matches (bounded cardinality)


class GatewayMetrics:
    """The gateway's registry; one RequestMetrics per request feeds it."""

    def __init__(self) -> None:
        r = self.registry = service_registry()
        self.model_name = ""  # the served model's name, once known (bind)

        self.ttft = model_histogram(
            r, "time_to_first_token_seconds", "Time to the first output token", TTFT_BUCKETS
        )
        self.itl = model_histogram(
            r, "inter_token_latency_seconds", "Time between output tokens of a sample", ITL_BUCKETS
        )
        self.e2e = model_histogram(
            r, "e2e_request_latency_seconds", "Arrival to last token of a request", E2E_BUCKETS
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Samples finished, by reason",
            [MODEL_NAME, "finished_reason"],
            registry=r,
        )
        self.rejections = Counter(
            PREFIX + "request_rejections",
            "Requests refused with 503 because a queue was full",
            [MODEL_NAME],
            registry=r,
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered, by route, method and status class",
            ["handler", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response",
            ["handler", "method"],
            registry=r,
            buckets=HTTP_BUCKETS,
        )

    def bind(self, model_name: str) -> None:
        """Names the served model (the label of the series recorded from now on); its counters
        exist from here on, at 0 until counted (a rate over them starts at the first scrape)."""
        self.model_name = model_name
        self.rejections.labels(model_name)
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)

    def request(self) -> RequestMetrics:
        return RequestMetrics(self, time.monotonic())

    def rejected(self) -> None:
        self.rejections.labels(self.model_name).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Latency and token accounting of one request (of one prompt, for batched completions)."""

    def __init__(self, metrics: GatewayMetrics | None, arrived: float) -> None:
        self.m, self.arrived = metrics, arrived  # m None: not recorded (internal probes)
        self.model = metrics.model_name if metrics is not None else ""
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
            self.m.ttft.labels(self.model).observe(now - self.arrived)
        elif previous is not None:
            itl = self.m.itl.labels(self.model)
            for _ in range(count):
                itl.observe((now - previous) / count)

    def finished(self, usage: Usage, reasons: list[str]) -> None:
        """The request ended; `reasons` has one finish reason per sample."""
        if self.m is None:
            return
        self.m.e2e.labels(self.model).observe(time.monotonic() - self.arrived)
        for reason in reasons:
            self.m.success.labels(self.model, reason).inc()


class HttpMetrics:
    """ASGI middleware counting and timing every HTTP request by its route's path template
    (`/v1/models/{model_id:path}`, not the path itself), method and status class (2xx, 4xx…).
    A response cut off before its end counts with the status it started with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = scope.get("route")
            handler = getattr(route, "path", UNMATCHED)
            m: GatewayMetrics = scope["app"].state.backend.metrics
            m.http_requests.labels(handler, scope["method"], f"{status[0] // 100}xx").inc()
            m.http_duration.labels(handler, scope["method"]).observe(time.perf_counter() - started)
