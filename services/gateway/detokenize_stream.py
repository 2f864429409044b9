"""The gateway's one DetokenizeBatch call per tokenizer connection, with a per-tick batcher.

Samples of every request in flight share the call. A `feed` only queues its ids and returns a
future; the first feed of an event-loop iteration schedules one flush for the end of it, so
the feeds of all the requests woken by one scheduler batch leave in one message, and their
text comes back in one response. Opens and closes ride along with the next message that
carries feeds. Responses answer messages in order, so the futures of each sent message wait
in a FIFO. When the call breaks, every feed waiting on it fails with the error its status maps
to (a killed tokenizer: Unavailable); the next sample opens a fresh call. With a tracer, each
message is a span linked to the generation spans of its feeds (see spans.py).

Failover: a `Detokenizer` keeps the ids it has fed and how much text it has returned. When its
call breaks and another tokenizer is configured, it opens the sample there, feeds every id again
(with the new ones) and returns only the text past what it already returned: detokenization is
deterministic, so the stream the client sees goes on unbroken.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import trace

from radixserve.v1 import tokenizer_pb2 as tpb
from radixserve.v1 import tokenizer_pb2_grpc as tpb_grpc
from services.gateway import convert
from services.gateway.errors import GatewayError, Unavailable, from_rpc_error, from_status
from services.gateway.events import TextDelta
from services.gateway.spans import detokenize_span

log = logging.getLogger("radixserve.gateway")


class DetokenizeCall:
    """One live DetokenizeBatch call: samples opened on it fail with it."""

    def __init__(self, stub: tpb_grpc.TokenizerStub, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer
        self._outbox: asyncio.Queue[tpb.DetokenizeBatchRequest | None] = asyncio.Queue()
        self._opens: list[tpb.DetokenizeOpen] = []
        self._feeds: list[tpb.DetokenizeFeed] = []
        self._closes: list[int] = []
        self._waiting: list[asyncio.Future[TextDelta]] = []  # one per queued feed
        self._links: list[trace.SpanContext] = []  # the queued feeds' generation spans
        # per message, in order: its feeds' futures and its span (None: not traced)
        self._sent: deque[tuple[list[asyncio.Future[TextDelta]], trace.Span | None]] = deque()
        self._flush_scheduled = False
        self.error: GatewayError | None = None  # set once the call broke
        self.messages_sent = 0
        call = stub.DetokenizeBatch(_drain(self._outbox))
        # A fresh context: the reader outlives the request that opened the call, and must not
        # log under its id.
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(call), context=contextvars.Context())

    @property
    def alive(self) -> bool:
        return self.error is None

    def open(self, sample_id: int, setup: tpb.DetokenizeSetup) -> None:
        self._opens.append(tpb.DetokenizeOpen(sample_id=sample_id, setup=setup))

    def feed(
        self,
        sample_id: int,
        ids: list[int],
        finish: bool,
        link: trace.SpanContext | None = None,
    ) -> asyncio.Future[TextDelta]:
        """Queues ids for the next message; the future gets the sample's TextDelta. `link`: the
        span of the generation the sample belongs to."""
        fut: asyncio.Future[TextDelta] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            fut.set_exception(self.error)
            return fut
        self._feeds.append(tpb.DetokenizeFeed(sample_id=sample_id, ids=ids, finish=finish))
        self._waiting.append(fut)
        if self._tracer is not None and link is not None:
            self._links.append(link)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def close(self, sample_id: int) -> None:
        """Forgets the sample; sent with the next message (or dropped if never opened there)."""
        opened = [o for o in self._opens if o.sample_id != sample_id]
        if len(opened) < len(self._opens):
            self._opens = opened
        elif self.alive:
            self._closes.append(sample_id)

    async def close_call(self) -> None:
        self._outbox.put_nowait(None)
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._feeds or self.error is not None:
            return
        msg = tpb.DetokenizeBatchRequest(open=self._opens, feeds=self._feeds, close=self._closes)
        span = None
        if self._tracer is not None:
            tokens = sum(len(f.ids) for f in self._feeds)
            span = detokenize_span(self._tracer, len(self._feeds), tokens, self._links)
            self._links = []
        self._opens, self._feeds, self._closes = [], [], []
        self._sent.append((self._waiting, span))
        self._waiting = []
        self._outbox.put_nowait(msg)
        self.messages_sent += 1

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                self._answer(reply)
            error: GatewayError = Unavailable("the tokenizer ended a detokenize stream early")
        except grpc.RpcError as err:
            # Errors of one sample come back in its result; the call itself ends only when the
            # tokenizer or the connection went away (UNAVAILABLE, CANCELLED, or gRPC core's
            # INTERNAL while a server stops): its samples may fail over.
            error = from_rpc_error(err, "tokenizer")
            if not isinstance(error, Unavailable):
                error = Unavailable(f"the tokenizer is unavailable: the stream broke: {error}")
        except asyncio.CancelledError:
            call.cancel()
            self._fail(Unavailable("the gateway is shutting down"))
            raise
        self._fail(error)

    def _answer(self, reply: tpb.DetokenizeBatchResponse) -> None:
        futures, span = self._sent.popleft()
        if span is not None:
            span.end()
        assert len(futures) == len(reply.results), "one result per feed"
        for fut, result in zip(futures, reply.results, strict=True):
            if fut.done():  # the waiting request was cancelled
                continue
            if result.WhichOneof("outcome") == "error":
                fut.set_exception(from_status(result.error.code, result.error.message, "tokenizer"))
            else:
                fut.set_result(convert.delta_from_pb(result.delta))

    def _fail(self, error: GatewayError) -> None:
        self.error = error
        pending = [f for futures, _ in self._sent for f in futures] + self._waiting
        for _, span in self._sent:
            if span is not None:
                span.set_status(trace.StatusCode.ERROR, error.message)
                span.end()
        self._sent.clear()
        self._waiting, self._feeds, self._links = [], [], []
        if pending:
            log.warning("detokenize stream broke with %d feeds waiting: %s", len(pending), error)
        for fut in pending:
            if not fut.done():
                fut.set_exception(error)


# Opens a sample on a tokenizer other than `avoid` (an address index; None: any): returns the
# call, the sample id and the address index, or None when there is no other tokenizer.
Opener = Callable[[tpb.DetokenizeSetup, int | None], tuple[DetokenizeCall, int, int] | None]


class Detokenizer:
    """One sample on a shared DetokenizeBatch call: each `feed` is answered by one TextDelta.
    With an `opener`, a broken call fails over to another tokenizer (see the module doc)."""

    def __init__(
        self,
        call: DetokenizeCall,
        sample_id: int,
        setup: tpb.DetokenizeSetup | None = None,
        address: int = 0,
        opener: Opener | None = None,
        link: trace.SpanContext | None = None,
    ) -> None:
        self._call, self.sample_id = call, sample_id
        self._setup, self._address, self._opener = setup, address, opener
        self._link = link  # the generation's span, for the detokenize messages' spans
        self._ids: list[int] = []  # ids consumed so far
        self._sent = 0  # characters of text returned so far
        self.failovers = 0
        self.finished = False

    async def feed(self, ids: list[int], finish: bool = False) -> TextDelta:
        try:
            delta = await self._call.feed(self.sample_id, ids, finish, self._link)
        except Unavailable as exc:
            delta = await self._failover(ids, finish, exc)
        self._ids += ids[: delta.num_tokens]
        self._sent += len(delta.text)
        self.finished = delta.finished
        return delta

    async def _failover(self, ids: list[int], finish: bool, error: Unavailable) -> TextDelta:
        """Replays the sample on another tokenizer; raises `error` when there is none."""
        opened = None
        if self._opener is not None and self._setup is not None:
            opened = self._opener(self._setup, self._address)
        if opened is None:
            raise error
        self._call, self.sample_id, self._address = opened
        self.failovers += 1
        log.warning("detokenizing sample %d again on tokenizer %d", self.sample_id, self._address)
        before = len(self._ids)
        whole = await self._call.feed(self.sample_id, self._ids + ids, finish, self._link)
        return TextDelta(
            whole.text[self._sent :],
            max(0, whole.num_tokens - before),
            whole.matched_stop,
            whole.finished,
        )

    def cancel(self) -> None:
        self._call.close(self.sample_id)


async def _drain(
    outbox: asyncio.Queue[tpb.DetokenizeBatchRequest | None],
) -> AsyncIterator[tpb.DetokenizeBatchRequest]:
    while (msg := await outbox.get()) is not None:
        yield msg
