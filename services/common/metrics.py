"""Prometheus plumbing shared by the services: a registry per service, its /metrics endpoint, and
the gRPC server metrics.

Every service exports what it measures itself, from its own endpoint (docs/metrics.md lists each
series, the service that serves it, and its vLLM and SGLang counterparts). radixserve's own
series are named `radixserve:<name>` and carry a `model_name` label (the served model name, as
vLLM's and SGLang's do); the standard families keep their usual names and labels: process_* and
python_* (prometheus_client's process, platform and GC collectors), grpc_server_* (the names of
go-grpc-prometheus, on the three gRPC services) and http_* (on the gateway).

The gRPC services serve /metrics from a small HTTP server on a thread of their own
(`--metrics-port`; unset, no endpoint); the gateway serves it on its HTTP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from services.common.config import option
from services.common.log import LogConfig

PREFIX = "radixserve:"
disable_created_metrics()  # no `_created` twin of every counter and histogram (as vLLM serves them)
MODEL_NAME = "model_name"
# Seconds: a unary call takes milliseconds; a stream lives as long as its generation.
GRPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)  # fmt: skip


@dataclass(frozen=True)
class ServiceConfig(LogConfig):
    """The options every gRPC service has: logging's, and its metrics endpoint."""

    metrics_port: int | None = option(
        None, "serve Prometheus metrics over HTTP at /metrics on this port (unset: none)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError("--metrics-port must be in [0, 65535]")


def model_histogram(
    registry: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...]
) -> Histogram:
    """A `radixserve:<name>` histogram labelled with the served model's name."""
    return Histogram(PREFIX + name, doc, [MODEL_NAME], registry=registry, buckets=buckets)


def service_registry() -> CollectorRegistry:
    """A fresh registry holding the process, platform and GC collectors (one per service, so
    several services in one test process do not collide)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class MetricsServer:
    """`registry` in Prometheus' text format at http://host:port/metrics, served by a daemon
    thread (prometheus_client's WSGI server). `port` 0 picks a free one (see `.port`)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int | None, log: Any
) -> MetricsServer | None:
    """Starts the endpoint when `port` is set (logging its address); None otherwise."""
    if port is None:
        return None
    server = MetricsServer(registry, host, port)
    log.info("metrics on http://%s:%d/metrics", host, server.port)
    return server


class GrpcServerMetrics(grpc.aio.ServerInterceptor):
    """Counts and times every RPC a server handles, under go-grpc-prometheus' names.

    grpc_server_started_total and grpc_server_handled_total (counters) and
    grpc_server_handling_seconds (histogram, start to end of the call, a stream's whole life),
    labelled grpc_service, grpc_method, grpc_type (unary, server_stream, client_stream,
    bidi_stream) and, on handled_total, grpc_code (the status code's name, OK on success).
    Messages on a stream pass through one extra generator; nothing is counted per message.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server", labels, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            [*labels, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start to the end of an RPC on the server",
            labels,
            registry=registry,
            buckets=GRPC_BUCKETS,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            make, behavior, kind = grpc.unary_unary_rpc_method_handler, handler.unary_unary, "unary"
        elif handler.unary_stream is not None:
            make, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
            kind = "server_stream"
        elif handler.stream_unary is not None:
            make, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
            kind = "client_stream"
        else:
            make, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
            kind = "bidi_stream"
        # A streaming behavior either yields its responses or is a coroutine that writes them.
        wrap = self._generator if inspect.isasyncgenfunction(behavior) else self._coroutine
        return make(
            wrap(behavior, (service, method, kind)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _coroutine(self, behavior: Callable, labels: tuple[str, str, str]) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observed(labels, context):
                return await behavior(request, context)

        return call

    def _generator(self, behavior: Callable, labels: tuple[str, str, str]) -> Callable:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._observed(labels, context):
                async for response in behavior(request, context):
                    yield response

        return call

    @contextlib.contextmanager
    def _observed(
        self, labels: tuple[str, str, str], context: grpc.aio.ServicerContext
    ) -> Iterator[None]:
        """Counts the call's start, and its end with the status code it ended with."""
        self.started.labels(*labels).inc()
        started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
        try:
            yield
            code = _code_of(context, grpc.StatusCode.OK)
        except BaseException as exc:
            code = _code_of(context, _exception_code(exc))
            raise
        finally:
            self.handled.labels(*labels, code.name).inc()
            self.seconds.labels(*labels).observe(time.perf_counter() - started)


def _code_of(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler set (by abort or set_code), else `default`."""
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), default)


def _exception_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
