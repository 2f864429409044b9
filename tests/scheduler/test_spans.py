"""The scheduler's span per sample, on the checking fake: a child of the caller's traceparent,
handed on to the executor, with admission, retraction, first-token and finish recorded, and an
error status when the sample fails."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common.tracing import traceparent
from tests.scheduler.fake_executor import FakeExecutor
from tests.scheduler.harness import collect, params, running_scheduler


def samples(exported: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {
        s.attributes["radixserve.request_id"]: s
        for s in exported.get_finished_spans()
        if s.name == "scheduler.request"
    }


def test_a_retracted_sample_is_one_span_with_its_story(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exported = traced
    caller = provider.get_tracer("test").start_span("gateway.generate")
    early = [[1] * 20, [2] * 20]

    async def main() -> FakeExecutor:
        fake = FakeExecutor(200, 16)
        async with running_scheduler(fake, schedule_conservativeness=0.2) as sched:
            sched.tracer = provider.get_tracer("radixserve.scheduler")
            streams = [
                sched.submit(params(f"r{i}", p, 60, ignore_eos=True)) for i, p in enumerate(early)
            ]
            while min((len(r.output) for r in sched.running), default=0) < 20:
                await asyncio.sleep(0)
            late = replace(
                params("late", [3] * 20, 60, ignore_eos=True), traceparent=traceparent(caller)
            )
            streams.append(sched.submit(late))
            for stream in streams:
                await collect(stream)
        return fake

    fake = asyncio.run(main())
    spans = samples(exported)
    assert sorted(spans) == ["late", "r0", "r1"]
    late = spans["late"]
    assert late.parent.span_id == caller.get_span_context().span_id
    events = [e.name for e in late.events]
    assert events == ["admitted", "first_token", "retracted", "admitted"]
    assert late.attributes["gen_ai.usage.output_tokens"] == 60
    assert late.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert late.attributes["radixserve.prefill.computed_tokens"] == 20
    assert late.status.is_ok
    assert spans["r0"].parent is None  # no traceparent: a trace of its own
    # Every AddRequest carries the span of the sample it adds (the late one twice).
    by_span = {s.context.span_id: rid for rid, s in spans.items()}
    added = [by_span[int(a.traceparent.split("-")[2], 16)] for step in fake.steps for a in step.add]
    assert sorted(added) == ["late", "late", "r0", "r1"]


def test_a_failed_sample_ends_its_span_with_an_error(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exported = traced

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        fake.reject_at_step = 3
        async with running_scheduler(fake) as sched:
            sched.tracer = provider.get_tracer("radixserve.scheduler")
            await collect(sched.submit(params("doomed", [1] * 10, 30, ignore_eos=True)))

    asyncio.run(main())
    span = samples(exported)["doomed"]
    assert not span.status.is_ok and "rejected" in span.status.description
    assert span.attributes["gen_ai.response.finish_reasons"] == ("abort",)
