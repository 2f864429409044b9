"""The gateway's own spans, made only when tracing is on (see services/common/tracing.py).

Beside them are the HTTP request's server span (ASGI middleware) and a client span per tokenizer
call (gRPC interceptor), both children of the current span.

`GenerationSpan` (`gateway.generate`): one per generation — one tokenized prompt on one scheduler —
a child of the HTTP request's span, from submission to the last output. It carries the request id
(the scheduler's), the model and sampling asked for, a `first_token` event, and at the end the
usage and finish reasons. Its traceparent travels to the scheduler in the GenerateRequest.

`detokenize_span` (`gateway.detokenize`): one per DetokenizeBatch message, from sending it to its
answer. A message carries the feeds of every sample one scheduler batch woke, so it belongs to no
single request: it links to the generation span of each feed instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context

from services.common import tracing
from services.gateway.events import Usage
from services.gateway.sampling import GenerationInput


class GenerationSpan:
    def __init__(self, tracer: trace.Tracer, inp: GenerationInput, model: str) -> None:
        s = inp.sampling
        attributes = {
            tracing.REQUEST_ID: inp.request_id,
            tracing.GEN_AI_REQUEST_MODEL: model,
            tracing.GEN_AI_REQUEST_TEMPERATURE: s.temperature,
            tracing.GEN_AI_REQUEST_TOP_P: s.top_p,
            tracing.GEN_AI_REQUEST_CHOICE_COUNT: s.n,
            tracing.GEN_AI_USAGE_INPUT_TOKENS: len(inp.input_ids),
        }
        if s.max_tokens is not None:
            attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] = s.max_tokens
        self.span = tracer.start_span(
            "gateway.generate", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        self.context = self.span.get_span_context()
        self.traceparent = tracing.traceparent(self.span)
        self._before_first_token = True

    def tokens(self) -> None:
        """New output tokens arrived (the first ones add the `first_token` event)."""
        if self._before_first_token:
            self._before_first_token = False
            self.span.add_event("first_token")

    def end(self, usage: Usage, finish_reasons: list[str], error: Exception | None) -> None:
        self.span.set_attributes(
            {
                tracing.GEN_AI_USAGE_OUTPUT_TOKENS: usage.completion_tokens,
                tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: usage.cached_tokens,
                tracing.GEN_AI_RESPONSE_FINISH_REASONS: finish_reasons,
            }
        )
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(trace.StatusCode.ERROR, str(error))
        self.span.end()


def detokenize_span(
    tracer: trace.Tracer, feeds: int, tokens: int, requests: Iterable[trace.SpanContext]
) -> trace.Span:
    """The span of one DetokenizeBatch message (ended by the caller when its answer arrives): a
    trace of its own, whatever request's task happened to send it."""
    return tracer.start_span(
        "gateway.detokenize",
        context=Context(),
        kind=trace.SpanKind.CLIENT,
        links=[trace.Link(c) for c in {c.span_id: c for c in requests}.values()],  # n > 1: once
        attributes={"radixserve.detokenize.feeds": feeds, "radixserve.detokenize.tokens": tokens},
    )
