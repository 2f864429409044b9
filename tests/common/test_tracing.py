"""Tracing set-up: off unless an endpoint is configured (and then free), on with the OTLP exporter
behind a BatchSpanProcessor, the standard OTEL_* variables honoured, context carried as traceparent."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.cli import build_parser
from services.common.config import env_name, from_args
from services.common.tracing import (
    ENDPOINT_VARIABLES,
    TracingConfig,
    build_provider,
    client_interceptors,
    instrument_asgi,
    parent_context,
    server_interceptors,
    session,
    traceparent,
    tracer,
)
from services.serve import child_commands

SERVICES = ("gateway", "tokenizer", "scheduler", "executor")


@pytest.fixture(autouse=True)
def no_tracing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ENDPOINT_VARIABLES, env_name("otlp_traces_endpoint"), "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)


@pytest.fixture
def provider() -> Iterator[list[TracerProvider]]:
    """Providers a test builds, shut down after it (which stops their exporter threads)."""
    built: list[TracerProvider] = []
    yield built
    for p in built:
        p.shutdown()


def exporter_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("OtelBatch")]


def cli_tracing(argv: list[str]) -> TracingConfig:
    return from_args(TracingConfig, build_parser().parse_args(argv))


@pytest.mark.parametrize("service", SERVICES)
def test_off_without_an_endpoint_installs_nothing(service: str) -> None:
    cfg = cli_tracing([service])
    assert cfg.endpoint is None and build_provider(cfg, service) is None
    app = object()
    with session(cfg, service):
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        assert tracer("radixserve.test") is None
        assert server_interceptors() == [] and client_interceptors() == []
        assert instrument_asgi(app) is app
        assert exporter_threads() == []


def test_an_endpoint_gives_a_batch_processor_with_the_otlp_exporter(
    provider: list[TracerProvider],
) -> None:
    cfg = cli_tracing(["scheduler", "--otlp-traces-endpoint", "http://127.0.0.1:4317"])
    built = build_provider(cfg, "scheduler")
    assert built is not None
    provider.append(built)
    (processor,) = built._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor.span_exporter
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "127.0.0.1:4317" and exporter._insecure  # http: plaintext
    assert built.resource.attributes["service.name"] == "radixserve-scheduler"
    assert exporter_threads() == ["OtelBatchSpanRecordProcessor"]
    built.shutdown()
    assert exporter_threads() == []


@pytest.mark.parametrize(
    ("env", "flag", "expected"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://all:4317"}, None, "http://all:4317"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://all:4317",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
            },
            None,
            "http://traces:4317",
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:4317"},
            "http://flag:4317",
            "http://flag:4317",
        ),
        ({"RADIXSERVE_OTLP_TRACES_ENDPOINT": "http://twin:4317"}, None, "http://twin:4317"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://all:4317", "OTEL_SDK_DISABLED": "true"},
            "http://flag:4317",
            None,
        ),
    ],
)
def test_endpoint_from_flag_and_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flag: str | None, expected: str | None
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = ["gateway", *(["--otlp-traces-endpoint", flag] if flag else [])]
    assert cli_tracing(argv).endpoint == expected


def test_service_name_defaults_per_service_and_yields_to_otel_variables(
    monkeypatch: pytest.MonkeyPatch, provider: list[TracerProvider]
) -> None:
    cfg = TracingConfig("http://127.0.0.1:4317")
    provider.append(p := build_provider(cfg, "executor"))  # type: ignore[arg-type]
    assert p.resource.attributes["service.name"] == "radixserve-executor"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,team=llm")
    provider.append(p := build_provider(cfg, "executor"))  # type: ignore[arg-type]
    assert p.resource.attributes["service.name"] == "from-attributes"
    assert p.resource.attributes["team"] == "llm"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-executor")
    provider.append(p := build_provider(cfg, "executor"))  # type: ignore[arg-type]
    assert p.resource.attributes["service.name"] == "my-executor"


def test_serve_hands_the_endpoint_to_all_four_services() -> None:
    args = build_parser().parse_args(["serve", "--otlp-traces-endpoint", "http://127.0.0.1:4317"])
    commands = dict(child_commands(args))
    assert sorted(commands) == sorted(SERVICES)
    for argv in commands.values():
        i = argv.index("--otlp-traces-endpoint")
        assert argv[i + 1] == "http://127.0.0.1:4317"
    plain = dict(child_commands(build_parser().parse_args(["serve"])))
    assert not any("--otlp-traces-endpoint" in argv for argv in plain.values())


def test_traceparent_makes_a_child_in_another_process() -> None:
    exported = InMemorySpanExporter()
    local = TracerProvider()
    local.add_span_processor(SimpleSpanProcessor(exported))
    t = local.get_tracer("test")
    parent = t.start_span("gateway.generate")
    header = traceparent(parent)
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    child = t.start_span("scheduler.request", context=parent_context(header))
    child.end()
    parent.end()
    spans = {s.name: s for s in exported.get_finished_spans()}
    got = spans["scheduler.request"]
    assert got.parent is not None and got.parent.is_remote
    assert got.parent.span_id == int(span_id, 16) == spans["gateway.generate"].context.span_id
    assert got.context.trace_id == int(trace_id, 16)
    assert parent_context("") is None  # no header: the current context is the parent
