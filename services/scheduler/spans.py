"""The scheduler's span of each sample, made only when tracing is on (services/common/tracing.py).

`scheduler.request`: one per sample, from its arrival to its end, a child of the caller's span (the
gateway's generation, named by GenerateRequest.traceparent; without one, a unary Generate's own
server span). It says where the sample's time went: the time queued until first admitted
(`radixserve.queue_time_s`), the prefill's prompt tokens taken from the cache
(`gen_ai.usage.cache_read.input_tokens`) and computed (`radixserve.prefill.computed_tokens`), an
`admitted` event per admission (a retracted sample is admitted again), `retracted` and
`first_token` events, and at the end the tokens generated and the finish reason (or the error).
Its traceparent travels to the executor in the sample's AddRequest.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from services.common import tracing

if TYPE_CHECKING:
    from services.scheduler.request import Req


class SampleSpan:
    def __init__(self, tracer: trace.Tracer, req: Req, traceparent: str) -> None:
        self.span = tracer.start_span(
            "scheduler.request",
            context=tracing.parent_context(traceparent),
            kind=trace.SpanKind.SERVER,
            attributes={
                tracing.REQUEST_ID: req.rid,
                "radixserve.sample_index": req.index,
                tracing.GEN_AI_USAGE_INPUT_TOKENS: len(req.prompt),
            },
        )
        self.traceparent = tracing.traceparent(self.span)
        self.arrived = time.monotonic()
        self.admitted_before = False

    def admitted(self, req: Req) -> None:
        """`req` got a row; its first `num_cached` positions come from the prefix cache."""
        computed = len(req.fill_ids) - req.num_cached
        if not self.admitted_before:
            self.admitted_before = True
            self.span.set_attributes(
                {
                    "radixserve.queue_time_s": time.monotonic() - self.arrived,
                    tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: req.num_cached,
                    "radixserve.prefill.computed_tokens": computed,
                }
            )
        self.span.add_event(
            "admitted",
            {"radixserve.cached_tokens": req.num_cached, "radixserve.computed_tokens": computed},
        )

    def retracted(self, req: Req) -> None:
        self.span.add_event("retracted", {"radixserve.output_tokens": len(req.output)})

    def first_token(self) -> None:
        self.span.add_event("first_token")

    def end(self, req: Req, reason: str, error: str | None = None) -> None:
        self.span.set_attributes(
            {
                tracing.GEN_AI_USAGE_OUTPUT_TOKENS: len(req.output),
                tracing.GEN_AI_RESPONSE_FINISH_REASONS: [reason],
            }
        )
        if error is not None:
            self.span.set_status(trace.StatusCode.ERROR, error)
        self.span.end()
