"""The executor's spans, made only when tracing is on (see services/common/tracing.py).

`executor.request`: one per request row, from the Step that adds it to the Step that releases it
(or a reset), a child of the scheduler's span of that sample (AddRequest.traceparent). It carries
the request id and the row, and at the end how many Steps computed the row and how many tokens.

`executor.step`: one per executed Step, from the start of its execution to its result: the step
id, its slices, the tokens computed, the rows sampled, added and released, the forward time. A
Step serves many requests, so it belongs to no request's trace: it links to the request span of
every row it computed instead.

Spans are recorded on the event loop once a Step's result is known (with the time its execution
began), so a rejected Step, which applies nothing, opens or closes no request span either.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry import trace

from radixserve.v1 import executor_pb2 as pb
from services.common import tracing
from services.executor.step import StepInput


@dataclass
class RowSpan:
    span: trace.Span
    steps: int = 0  # Steps that computed a slice of the row
    tokens: int = 0  # positions those slices computed


class StepSpans:
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self.rows: dict[int, RowSpan] = {}

    def record(self, step: StepInput, started_ns: int, result: pb.StepResult) -> None:
        """The spans of one executed Step, whose execution began at `started_ns` (epoch ns)."""
        rejected = result.HasField("error")
        if not rejected:
            self._apply_membership(step, started_ns)
        failed = {result.rows[i] for i in result.failed} | set(result.unwritten_rows)
        links = []
        iterations = max(1, result.decode_iterations)  # a decode slice's positions
        for s in step.slices:
            row = self.rows.get(s.row)
            if row is None:  # added by this rejected Step
                continue
            if not rejected:
                row.steps += 1
                row.tokens += s.length * iterations
            links.append(trace.Link(row.span.get_span_context()))
        span = self.tracer.start_span(
            "executor.step",
            start_time=started_ns,
            links=links,
            attributes={
                "radixserve.step.id": step.step_id,
                "radixserve.step.slices": len(step.slices),
                "radixserve.step.tokens": result.num_tokens,
                "radixserve.step.decode_iterations": iterations,
                "radixserve.step.sampled": len(result.rows),
                "radixserve.step.adds": len(step.add),
                "radixserve.step.releases": len(step.release_rows),
                "radixserve.step.forward_ns": result.forward_ns,
                "radixserve.step.failed_rows": len(failed),
            },
        )
        if rejected:
            span.set_status(trace.StatusCode.ERROR, result.error.message)
        span.end()

    def reset(self) -> None:
        """Every row is gone (a reset, or the scheduler detached)."""
        for row in list(self.rows):
            self._end(row, None)

    def _apply_membership(self, step: StepInput, at_ns: int) -> None:
        """Releases, then adds, as the engine applies them."""
        for row in step.release_rows:
            self._end(row, at_ns)
        for req in step.add:
            span = self.tracer.start_span(
                "executor.request",
                context=tracing.parent_context(req.traceparent),
                start_time=at_ns,
                attributes={tracing.REQUEST_ID: req.request_id, "radixserve.executor.row": req.row},
            )
            self.rows[req.row] = RowSpan(span)

    def _end(self, row: int, at_ns: int | None) -> None:
        state = self.rows.pop(row, None)
        if state is None:
            return
        state.span.set_attributes(
            {"radixserve.executor.steps": state.steps, "radixserve.executor.tokens": state.tokens}
        )
        state.span.end(end_time=at_ns)
