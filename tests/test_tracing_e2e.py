"""Tracing end to end: `radixserve serve --otlp-traces-endpoint` exports one streamed chat
request as one trace with spans of all four services, parented right, to an OTLP/gRPC receiver
in this process; the batched executor steps link to the request instead. The spans are exported
only by the flush at exit (the batch delay is longer than the test), which SIGTERM must reach."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from openai import OpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.procs import Serve, free_port

pytestmark = pytest.mark.slow
SERVICES = {
    "radixserve-gateway",
    "radixserve-tokenizer",
    "radixserve-scheduler",
    "radixserve-executor",
}


@dataclass(frozen=True)
class Span:
    service: str  # the resource's service.name
    name: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes  # empty for a root
    attributes: dict[str, Any]
    events: list[str]  # their names
    links: list[tuple[bytes, bytes]]  # (trace id, span id)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span it is sent."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):  # type: ignore[no-untyped-def]
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                spans += [
                    Span(
                        resource["service.name"],
                        s.name,
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        _attributes(s.attributes),
                        [event.name for event in s.events],
                        [(link.trace_id, link.span_id) for link in s.links],
                    )
                    for s in scope_spans.spans
                ]
        with self._lock:
            self._spans += spans
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    collector = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, port
    server.stop(0)


def stream_one_chat(port: int) -> str:
    """Streams one chat completion; returns its id (the request id every service records)."""
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    chunks = list(
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks[0].id


def trace_of(collector: Receiver, request_id: str, timeout_s: float = 20.0) -> list[Span]:
    """The spans of the trace whose gateway generation has `request_id`, once all four services
    are in it (bounded wait: every exporter has flushed by the time serve exits)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = collector.spans()
        roots = [
            s.trace_id
            for s in spans
            if s.name == "gateway.generate"
            and s.attributes.get("radixserve.request_id") == request_id
        ]
        trace = [s for s in spans if roots and s.trace_id == roots[0]]
        if {s.service for s in trace} >= SERVICES or time.monotonic() > deadline:
            return trace
        time.sleep(0.2)


def test_a_streamed_chat_is_one_trace_across_the_four_services(
    tmp_path: Path,
    default_model_dir: Path,
    receiver: tuple[Receiver, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector, otlp_port = receiver
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)  # the defaults are under test
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # export only when flushed at exit
    port = free_port()
    endpoint = ["--otlp-traces-endpoint", f"http://127.0.0.1:{otlp_port}"]
    server = Serve(port, tmp_path / "serve.log", endpoint)
    try:
        server.wait_ready()
        request_id = stream_one_chat(port)
        assert collector.spans() == []  # nothing before the flush
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.stderr()[-3000:]
    finally:
        server.kill_all()

    spans = trace_of(collector, request_id)
    by_id = {s.span_id: s for s in spans}
    assert {s.service for s in spans} == SERVICES, sorted((s.service, s.name) for s in spans)
    (root,) = [s for s in spans if not s.parent_span_id]
    assert (root.service, root.name) == ("radixserve-gateway", "POST /v1/chat/completions")
    for s in spans:  # every other span's parent is in the trace
        assert s.parent_span_id in by_id or s is root, (s.service, s.name)

    def named(service: str, name: str) -> Span:
        (span,) = [s for s in spans if (s.service, s.name) == (f"radixserve-{service}", name)]
        return span

    # HTTP request → tokenizer call (client, then server span) and generation → scheduler
    # sample → executor row, every one a child of the one before.
    template = "/radixserve.v1.Tokenizer/ApplyChatTemplate"
    client, handler = named("gateway", template), named("tokenizer", template)
    generate = named("gateway", "gateway.generate")
    sample = named("scheduler", "scheduler.request")
    row = named("executor", "executor.request")
    assert client.parent_span_id == generate.parent_span_id == root.span_id
    assert handler.parent_span_id == client.span_id
    assert sample.parent_span_id == generate.span_id
    assert row.parent_span_id == sample.span_id
    for s in (generate, handler, sample, row):
        assert s.attributes["radixserve.request_id"] == request_id, s.name
    for s in (generate, sample):
        assert s.attributes["gen_ai.usage.output_tokens"] == 8, s.name
        assert s.attributes["gen_ai.response.finish_reasons"] == ["length"], s.name
        assert "first_token" in s.events, s.name
    assert "admitted" in sample.events and sample.attributes["radixserve.queue_time_s"] >= 0
    prompt = sample.attributes["gen_ai.usage.input_tokens"]
    assert generate.attributes["gen_ai.usage.input_tokens"] == prompt
    assert row.attributes["radixserve.executor.tokens"] == prompt + 7  # the last token is not fed

    # Batched work belongs to no single request: the executor's steps and the gateway's
    # detokenize messages are traces of their own that link to the request's spans.
    everything = collector.spans()
    steps = [s for s in everything if (row.trace_id, row.span_id) in s.links]
    # The prefill, then one decode of 7 iterations (--num-continuous-decode-steps is 8 on the
    # CPU, and no step runs past the request's max_tokens).
    assert {s.name for s in steps} == {"executor.step"} and len(steps) == 2
    assert [s.attributes["radixserve.step.decode_iterations"] for s in steps] == [1, 7]
    assert sum(s.attributes["radixserve.step.tokens"] for s in steps) == prompt + 7
    messages = [s for s in everything if (generate.trace_id, generate.span_id) in s.links]
    assert {s.name for s in messages} == {"gateway.detokenize"}
    for s in [*steps, *messages]:
        assert s.trace_id != root.trace_id and not s.parent_span_id
    # Probes, polls and the long-lived streams make no spans.
    untraced = ("/ready", "/Check", "/GetLoad", "/Health", "/Run", "/Stream", "/DetokenizeBatch")
    assert not [s.name for s in everything if s.name.endswith(untraced)]
