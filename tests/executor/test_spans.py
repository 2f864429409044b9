"""The executor's spans: a request row is a child of the scheduler's span from its add to its
release; each Step is a span of its own linked to the rows it computed; a rejected Step changes
no request span; a reset ends them all."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from radixserve.v1 import executor_pb2 as pb
from services.common.tracing import traceparent
from services.executor.sampling_params import SamplingParams
from services.executor.spans import StepSpans
from services.executor.step import NewRequest, Slice, StepInput

G = SamplingParams(temperature=0)


def ok(step_id: int, tokens: int, rows: list[int]) -> pb.StepResult:
    return pb.StepResult(step_id=step_id, num_tokens=tokens, rows=rows, token_ids=[7] * len(rows))


def finished(exported: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exported.get_finished_spans() if s.name == name]


def test_rows_are_children_of_the_scheduler_and_steps_link_to_them(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exported = traced
    tracer = provider.get_tracer("test")
    parents = [tracer.start_span(f"scheduler.request {i}") for i in range(2)]
    spans = StepSpans(tracer)
    adds = [NewRequest(i, f"r{i}", G, traceparent=traceparent(p)) for i, p in enumerate(parents)]
    prefill = [Slice(0, 0, [1, 2, 3]), Slice(1, 0, [4, 5])]
    spans.record(StepInput(1, add=adds, slices=prefill), 1_000, ok(1, 5, [0, 1]))
    decode = [Slice(0, 3, [], use_last_sampled=True), Slice(1, 2, [], use_last_sampled=True)]
    spans.record(StepInput(2, slices=decode), 2_000, ok(2, 2, [0, 1]))
    rejected = pb.StepResult(step_id=3, error=pb.StepError(code=3, message="bad"))
    extra = NewRequest(2, "r2", G, traceparent=traceparent(parents[0]))
    spans.record(StepInput(3, add=[extra], slices=[Slice(2, 0, [9])]), 3_000, rejected)
    spans.record(StepInput(4, release_rows=[0]), 4_000, ok(4, 0, []))

    (row0,) = finished(exported, "executor.request")  # row 1 is still held, row 2 never joined
    assert row0.parent.span_id == parents[0].get_span_context().span_id
    assert (row0.start_time, row0.end_time) == (1_000, 4_000)
    assert row0.attributes["radixserve.request_id"] == "r0"
    assert row0.attributes["radixserve.executor.steps"] == 2
    assert row0.attributes["radixserve.executor.tokens"] == 4
    steps = {s.attributes["radixserve.step.id"]: s for s in finished(exported, "executor.step")}
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(s.parent is None for s in steps.values())
    assert len(steps[1].links) == len(steps[2].links) == 2 and not steps[4].links
    assert steps[1].links[0].context.span_id == row0.context.span_id
    assert steps[1].attributes["radixserve.step.tokens"] == 5
    assert not steps[3].status.is_ok and not steps[3].links  # it opened no row

    spans.reset()
    row1 = [s for s in finished(exported, "executor.request") if s is not row0]
    assert [s.attributes["radixserve.request_id"] for s in row1] == ["r1"]
    assert spans.rows == {}
