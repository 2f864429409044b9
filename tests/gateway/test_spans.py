"""The gateway's span per generation, over fake clients: what it records, and that the scheduler
request and the samples' detokenize messages are tied to it."""

from __future__ import annotations

import asyncio
import contextlib

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import traceparent
from services.gateway.errors import Overloaded
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.sampling import GenerationInput, SamplingParams, TextOptions
from tests.gateway.fakes import FakeScheduler, FakeTokenizer, chunks_of, end_of


def traced_run(events: list, n: int = 1) -> tuple[ReadableSpan, FakeScheduler, FakeTokenizer]:
    """Runs a generation with tracing on; returns its finished span and the fakes."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    sampling = SamplingParams(temperature=0.5, n=n, max_tokens=64)
    inp = GenerationInput("chatcmpl-1", [1, 2, 3], sampling, TextOptions())
    scheduler, tokenizer = FakeScheduler(events), FakeTokenizer()
    tracer = provider.get_tracer("radixserve.gateway")
    metrics = RequestMetrics.disabled()
    gen = Generation(inp, scheduler, tokenizer, metrics, 60.0, tracer, "smol")  # type: ignore[arg-type]

    async def consume() -> None:
        async for _ in gen.outputs():
            pass

    with contextlib.suppress(Overloaded):
        asyncio.run(consume())
    (span,) = exported.get_finished_spans()
    assert gen.span is not None and scheduler.traceparent == traceparent(gen.span.span)
    return span, scheduler, tokenizer


def test_a_generation_span_records_the_request_usage_and_first_token() -> None:
    samples = [chunks_of("hi there", index=i) for i in range(2)]
    events: list = [chunk for pair in zip(*samples, strict=True) for chunk in pair]
    events += [end_of("hi there", "length", index=i) for i in range(2)]
    span, _, tokenizer = traced_run(events, n=2)
    assert span.name == "gateway.generate" and span.status.is_ok
    assert span.attributes["radixserve.request_id"] == "chatcmpl-1"
    assert span.attributes["gen_ai.request.model"] == "smol"
    assert span.attributes["gen_ai.request.temperature"] == 0.5
    assert span.attributes["gen_ai.request.choice.count"] == 2
    assert span.attributes["gen_ai.usage.input_tokens"] == 3
    assert span.attributes["gen_ai.usage.output_tokens"] == 2 * len("hi there")
    assert span.attributes["gen_ai.response.finish_reasons"] == ("length", "length")
    assert [e.name for e in span.events] == ["first_token"]
    assert tokenizer.links == [span.context, span.context]  # both samples' detokenize messages


def test_a_refused_generation_ends_its_span_with_the_error() -> None:
    span, _, _ = traced_run([Overloaded("queue full")])
    assert not span.status.is_ok and "queue full" in span.status.description
    assert [e.name for e in span.events] == ["exception"]
