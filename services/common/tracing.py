"""OpenTelemetry tracing: the per-process set-up, and W3C trace context across the services.

Tracing is on when an OTLP/gRPC endpoint is configured: `--otlp-traces-endpoint` (vLLM's flag; env
RADIXSERVE_OTLP_TRACES_ENDPOINT) or the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
OTEL_EXPORTER_OTLP_ENDPOINT, unless OTEL_SDK_DISABLED=true. Off, nothing is installed: the OTel API
stays its no-op self, no exporter thread runs, `tracer()` is None so the services make no span
objects, and no interceptor or middleware is added. On, spans go through a BatchSpanProcessor to
the OTLP exporter (both read the usual OTEL_BSP_* and OTEL_EXPORTER_OTLP_* variables; the sampler
comes from OTEL_TRACES_SAMPLER) and are flushed when the process ends (`session`).

Context crosses the processes two ways. Unary calls carry it in gRPC metadata (the asyncio
interceptors of opentelemetry-instrumentation-grpc: gateway → tokenizer, unary scheduler calls).
A long-lived stream carries many requests (gateway → scheduler `Stream`, scheduler → executor
`Run`, the gateway's detokenize batches), so a request's W3C `traceparent` travels in its own
message there (GenerateRequest, AddRequest). Those streams are not traced themselves (a span would
last as long as the connection), nor are polls (health checks, GetLoad), which would add spans
every half second.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.config import option

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Long-lived calls and polls: never traced (see the module doc).
UNTRACED_METHODS = (
    "Stream",
    "DetokenizeBatch",
    "Run",
    "GetLoad",
    "Health",
    "Check",
    "Watch",
    "ServerReflectionInfo",
)
# Probes and scrapes the gateway answers every few seconds (regexes over the request URL).
UNTRACED_URLS = r"/(health|ready|metrics)$"

# Span attributes. The request id is radixserve's own: OpenTelemetry's GenAI conventions have no
# request id (vLLM's `gen_ai.request.id` is its own addition); the gen_ai.* names are theirs.
REQUEST_ID = "radixserve.request_id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingConfig:
    """Shared by every service (a flag group of its own, handed to each by `radixserve serve`)."""

    otlp_traces_endpoint: str | None = option(
        None,
        "OTLP/gRPC collector that receives traces, e.g. http://127.0.0.1:4317 (default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; none: tracing is off)",
    )

    @property
    def endpoint(self) -> str | None:
        """Where spans go; None when tracing is off."""
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        if self.otlp_traces_endpoint:
            return self.otlp_traces_endpoint
        return next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)


def build_provider(cfg: TracingConfig, service: str) -> TracerProvider | None:
    """A TracerProvider exporting over OTLP/gRPC to `cfg.endpoint` (None when tracing is off), for
    the resource `radixserve-<service>` unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name
    it. Its BatchSpanProcessor starts the exporter thread."""
    endpoint = cfg.endpoint
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    default = Resource.create({SERVICE_NAME: f"radixserve-{service}"})
    provider = TracerProvider(resource=default.merge(OTELResourceDetector().detect()))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


@contextlib.contextmanager
def session(cfg: TracingConfig, service: str) -> Iterator[None]:
    """Tracing for this process while the block runs: installed first, flushed and shut down at
    the end (every service returns from its main on SIGTERM, so that flushes too)."""
    provider = build_provider(cfg, service)
    if provider is None:
        yield
        return
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()


def tracer(name: str) -> trace.Tracer | None:
    """This process's tracer, or None when tracing is off (callers then make no spans)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer(name)


def traceparent(span: trace.Span) -> str:
    """The W3C traceparent header of `span`, for a child in another process."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def parent_context(header: str) -> Context | None:
    """The context a W3C traceparent names, for its child span; None for an empty header (the
    child then takes the current context's span as parent, or starts a trace)."""
    return _PROPAGATOR.extract({"traceparent": header}) if header else None


def server_interceptors() -> list[Any]:
    """gRPC server interceptors: a span per traced call, a child of the caller's (metadata)."""
    if tracer(__name__) is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_methods())]


def client_interceptors() -> list[Any]:
    """gRPC client interceptors: a span per traced unary call, its context sent in metadata. Only
    the unary-unary one: with none for streams, streaming calls skip interception entirely."""
    if tracer(__name__) is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(filter_=_traced_methods())[:1]


def instrument_asgi(app: Any) -> Any:
    """`app` inside OpenTelemetry's ASGI middleware (a server span per HTTP request, continuing a
    client's traceparent header; none for probes), or `app` itself when tracing is off."""
    if tracer(__name__) is None:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(
        app, excluded_urls=UNTRACED_URLS, exclude_spans=["receive", "send"]
    )


def _traced_methods() -> Any:
    from opentelemetry.instrumentation.grpc.filters import any_of, method_name, negate

    return negate(any_of(*(method_name(m) for m in UNTRACED_METHODS)))
