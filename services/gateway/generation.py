"""One request in flight: scheduler tokens → per-sample detokenization with stop strings → outputs.

`Generation.outputs()` yields the new text of each choice as the scheduler streams tokens; the
scheduler interleaves the n samples of a request. A stop string ends a sample at the gateway: with
n = 1 the scheduler request is aborted at once; with n > 1 the other samples keep running (Abort
ends a whole request), the stopped one's further tokens are dropped, and the request is aborted
once every sample is done. Whatever ends the iteration early — a consumer that stops reading, a
client that went away, an error — aborts the scheduler request without waiting (see `abort`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from opentelemetry import trace

from services.gateway.clients import SchedulerClient, TokenizerClient
from services.gateway.detokenize_stream import Detokenizer
from services.gateway.errors import InvalidRequest
from services.gateway.events import (
    Output,
    SampleEnd,
    TextDelta,
    TokenChunk,
    TokenLogprob,
    TokenPiece,
    Usage,
)
from services.gateway.metrics import RequestMetrics
from services.gateway.sampling import GenerationInput
from services.gateway.scheduler_stream import RequestEvents
from services.gateway.spans import GenerationSpan


class Sample:
    """One sample's detokenize stream and token accounting."""

    def __init__(
        self, index: int, detok: Detokenizer, top_n: int | None, inp: GenerationInput | None = None
    ) -> None:
        self.index, self.detok = index, detok
        self.top_n = top_n  # None: no logprobs
        self.prompt_ids = inp.input_ids if inp is not None else []
        self.hide_output = inp is not None and inp.hide_output  # the one token is not shown
        self.finished = False  # no more outputs (the scheduler may still be running it)
        self.finish_reason: str | None = None
        self.scheduler_done = False
        self.usage = Usage()
        self.last_token_at: float | None = None

    async def on_chunk(self, chunk: TokenChunk, tokenizer: TokenizerClient) -> Output | None:
        """The output of new tokens; the last one (a stop string matched, or the scheduler's end
        came with the tokens) carries the finish."""
        end = chunk.end
        if end is not None:
            self.scheduler_done = True
        if self.finished:
            return None
        prompt = await self._prompt_logprobs(chunk, tokenizer)
        if self.hide_output:
            chunk = replace(chunk, token_ids=[], logprobs=[], top_ids=[], top_logprobs=[])
        delta = await self.detok.feed(chunk.token_ids, finish=end is not None)
        ids = chunk.token_ids[: delta.num_tokens]
        self.usage.completion_tokens += delta.num_tokens
        self.usage.prompt_tokens, self.usage.cached_tokens = (
            chunk.prompt_tokens,
            chunk.cached_tokens,
        )
        logprobs = await self._logprobs(chunk, delta.num_tokens, tokenizer)
        out = Output(self.index, delta.text, ids, logprobs, prompt_logprobs=prompt)
        if delta.finished:
            self._finish(out, delta, end, cut=delta.num_tokens < len(chunk.token_ids))
        return out

    async def on_end(self, end: SampleEnd, tokenizer: TokenizerClient) -> Output | None:
        """The end of a sample that came without tokens: held-back text flushed, the finish."""
        return await self.on_chunk(TokenChunk.ending(end), tokenizer)

    def _finish(self, out: Output, delta: TextDelta, end: SampleEnd | None, cut: bool) -> None:
        """Sets the finish on `out`: a matched stop string or regex, else the scheduler's reason.
        The scheduler's counts are the sample's usage unless a stop string cut its tokens."""
        self.finished = True
        if end is not None and not cut:
            shown = 0 if self.hide_output else end.completion_tokens
            self.usage = Usage(end.prompt_tokens, shown, end.cached_tokens)
        if self.hide_output and end is not None:
            # The prompt alone: the one token computed past it is not shown, whatever it was.
            self.finish_reason = "length" if end.reason in ("stop", "length") else end.reason
        elif delta.matched_stop is not None:
            self.finish_reason, out.matched_stop = "stop", delta.matched_stop
        else:
            assert end is not None, "only a stop string finishes a sample before its end"
            self.finish_reason, out.matched_stop = end.reason, end.matched_stop_token
        out.finish_reason = self.finish_reason

    async def _logprobs(
        self, chunk: TokenChunk, count: int, tokenizer: TokenizerClient
    ) -> list[TokenLogprob]:
        if self.top_n is None or count == 0:
            return []
        return await token_logprobs(
            tokenizer,
            chunk.token_ids[:count],
            chunk.logprobs,
            chunk.top_ids,
            chunk.top_logprobs,
            self.top_n,
        )

    async def _prompt_logprobs(
        self, chunk: TokenChunk, tokenizer: TokenizerClient
    ) -> list[TokenLogprob | None] | None:
        """The prompt's logprobs when `chunk` brings them: one entry per prompt token, None
        before `prompt_logprob_start` (the first token has none)."""
        start = chunk.prompt_logprob_start
        if start is None:
            return None
        values = chunk.prompt_logprobs
        k = len(chunk.prompt_top_ids) // max(len(values), 1)
        ids = self.prompt_ids[start : start + len(values)]
        entries = await token_logprobs(
            tokenizer, ids, values, chunk.prompt_top_ids, chunk.prompt_top_logprobs, k
        )
        return [None] * start + entries


async def token_logprobs(
    tokenizer: TokenizerClient,
    ids: list[int],
    logprobs: list[float],
    top_ids: list[int],
    top_logprobs: list[float],
    k: int,
) -> list[TokenLogprob]:
    """One TokenLogprob per token of `ids`, with the texts of the token and of its `k`
    alternatives (`top_ids` / `top_logprobs`: k per token, flattened, most likely first)."""
    tops = [top_ids[i * k : (i + 1) * k] for i in range(len(ids))]
    pieces = await tokenizer.token_pieces(itertools.chain(ids, *tops))
    return [
        TokenLogprob(
            pieces[t],
            logprobs[i],
            _top(pieces, tops[i], top_logprobs[i * k : (i + 1) * k]),
            t,
            tops[i],
        )
        for i, t in enumerate(ids)
    ]


def _top(
    pieces: dict[int, TokenPiece], ids: list[int], logprobs: list[float]
) -> list[tuple[TokenPiece, float]]:
    return [(pieces[t], lp) for t, lp in zip(ids, logprobs, strict=True)]


class Generation:
    """Runs one GenerationInput on one scheduler; iterate `outputs()` once. With a `tracer`, the
    iteration is a span (see spans.py) naming `model`."""

    def __init__(
        self,
        inp: GenerationInput,
        scheduler: SchedulerClient,
        tokenizer: TokenizerClient,
        metrics: RequestMetrics,
        timeout_s: float,
        tracer: trace.Tracer | None = None,
        model: str = "",
    ) -> None:
        self.inp, self.scheduler, self.tokenizer = inp, scheduler, tokenizer
        self.metrics, self.timeout_s = metrics, timeout_s
        self.tracer, self.model = tracer, model
        self.samples: list[Sample] = []
        self.span: GenerationSpan | None = None
        self._stream: RequestEvents | None = None

    @property
    def usage(self) -> Usage:
        """Prompt counted once, completions summed over the samples."""
        first = self.samples[0].usage if self.samples else Usage()
        completion = sum(s.usage.completion_tokens for s in self.samples)
        return Usage(first.prompt_tokens, completion, first.cached_tokens)

    async def outputs(self) -> AsyncIterator[Output]:
        span = self.span = (
            GenerationSpan(self.tracer, self.inp, self.model) if self.tracer is not None else None
        )
        error: Exception | None = None
        try:
            traceparent = span.traceparent if span is not None else ""
            self._stream = self.scheduler.generate(self.inp, self.timeout_s, traceparent)
            self.samples = await self._open_samples()
            while not all(s.finished for s in self.samples):
                event = await self._next_event()
                if event is None:
                    break
                out = await self._dispatch(event)
                if out is not None:
                    yield out
        except Exception as exc:
            error = exc
            raise
        finally:
            reasons = self._close()
            if span is not None:
                span.end(self.usage, reasons, error)

    async def _next_event(self) -> TokenChunk | SampleEnd | None:
        assert self._stream is not None
        try:
            return await self._stream.next()
        except InvalidRequest as exc:
            # The grammar did not compile: name the field it came from.
            if exc.param is None and self.inp.sampling.grammar is not None:
                exc.param = self.inp.sampling.grammar_param
            raise

    def abort(self) -> None:
        """Ends the request at the scheduler now; safe to call from a task being cancelled."""
        if self._stream is not None:
            self._stream.cancel()
        self.scheduler.abort_soon(self.inp.request_id)

    async def _open_samples(self) -> list[Sample]:
        s = self.inp.sampling
        top_n = s.top_logprobs if s.logprobs else None
        link = self.span.context if self.span is not None else None
        opened = await asyncio.gather(
            *(self.tokenizer.detokenizer(self.inp, i, link) for i in range(s.n)),
            return_exceptions=True,
        )
        failed = [d for d in opened if isinstance(d, BaseException)]
        if failed:
            for d in opened:
                if isinstance(d, Detokenizer):
                    d.cancel()
            raise failed[0]
        return [Sample(i, d, top_n, self.inp) for i, d in enumerate(opened)]  # type: ignore[arg-type]

    async def _dispatch(self, event: TokenChunk | SampleEnd) -> Output | None:
        sample = self.samples[event.index]
        if isinstance(event, SampleEnd):
            return await sample.on_end(event, self.tokenizer)
        out = await sample.on_chunk(event, self.tokenizer)
        if out is not None and out.token_ids:
            now = time.monotonic()
            self.metrics.tokens(now, sample.last_token_at, len(out.token_ids))
            sample.last_token_at = now
            if self.span is not None:
                self.span.tokens()
        return out

    def _close(self) -> list[str]:
        """Aborts and closes what is still open, counts the request in the metrics and returns
        its samples' finish reasons (none for a request the scheduler refused to take)."""
        if self._stream is None:
            return []
        if not all(s.scheduler_done for s in self.samples) or not self.samples:
            self.abort()
        for sample in self.samples:
            if not sample.detok.finished:
                sample.detok.cancel()
        # A client that went away (the task cancelled) counts as "abort".
        reasons = [s.finish_reason or "abort" for s in self.samples]
        self.metrics.finished(self.usage, reasons)
        return reasons
