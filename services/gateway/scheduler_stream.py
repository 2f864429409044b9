"""The gateway's one multiplexed Stream call per scheduler, demultiplexed to its requests.

Every request to a scheduler is a Generate message on one long-lived bidi call; each StreamBatch
that comes back carries the events of many requests (one per scheduler step, or several steps
coalesced), and is split here into per-request queues. The call opens on first use and again
after it broke; when it breaks, every request on it fails with the error its status maps to
(a killed scheduler: Unavailable, as soon as the connection drops).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from radixserve.v1 import scheduler_pb2 as spb
from radixserve.v1 import scheduler_pb2_grpc as spb_grpc
from services.gateway import convert
from services.gateway.errors import (
    GatewayError,
    InvalidRequest,
    Timeout,
    Unavailable,
    from_rpc_error,
)
from services.gateway.events import SampleEnd, TokenChunk

log = logging.getLogger("radixserve.gateway")

Item = TokenChunk | SampleEnd | GatewayError


class RequestEvents:
    """One request's events; `next` ends (None) after the n-th SampleEnd.

    The shared call is read at the scheduler's pace; a reader slower than that finds several
    batches' tokens waiting and gets them as one chunk per sample (chunks before ends, as the
    scheduler coalesces for a slow Generate reader). A sample's end that is waiting with its
    last tokens rides on their chunk (`TokenChunk.end`), so the last tokens and the finish reach
    the client together; an end with no tokens left to ride on (a stop token, an abort) comes
    alone. `timeout_s` bounds the whole request: past it, `next` raises Timeout (what a Generate
    deadline gave).
    """

    def __init__(self, owner: SchedulerStream, request_id: str, n: int, timeout_s: float) -> None:
        self._owner, self.request_id = owner, request_id
        self._chunks: dict[int, TokenChunk] = {}  # sample index -> tokens not yet taken
        self._ends: list[SampleEnd | GatewayError] = []
        self._taken: deque[Item] = deque()  # taken, not yet returned by `next`
        self._wake = asyncio.Event()
        self._open_samples = n  # samples the reader has not seen end
        self._unsent_ends = n  # samples the scheduler has not ended (as put)
        self._deadline = asyncio.get_running_loop().time() + timeout_s

    def put(self, item: Item) -> bool:
        """Queues an event; True when it is the request's last."""
        if isinstance(item, TokenChunk):
            held = self._chunks.get(item.index)
            self._chunks[item.index] = item if held is None else merge_chunks(held, item)
        else:
            self._ends.append(item)
            self._unsent_ends = 0 if isinstance(item, GatewayError) else self._unsent_ends - 1
        self._wake.set()
        return self._unsent_ends == 0

    async def next(self) -> TokenChunk | SampleEnd | None:
        """The next event; None once every sample ended. Raises the request's GatewayError."""
        if self._open_samples == 0:
            return None
        if not self._taken:
            await self._wait()
            self._taken.extend(with_ends(list(self._chunks.values()), self._ends))
            self._chunks.clear()
            self._ends.clear()
            self._wake.clear()
        item = self._taken.popleft()
        if isinstance(item, GatewayError):
            self._open_samples = 0
            raise item
        if isinstance(item, SampleEnd) or item.end is not None:
            self._open_samples -= 1
        return item

    async def _wait(self) -> None:
        try:
            async with asyncio.timeout_at(self._deadline):
                await self._wake.wait()
        except TimeoutError:
            raise Timeout("the scheduler did not answer in time") from None

    def cancel(self) -> None:
        """Stops delivering this request's events (the caller aborts it separately)."""
        self._owner.forget(self.request_id)


class SchedulerStream:
    """The multiplexed Stream call to one scheduler: submit, abort, demultiplex."""

    def __init__(self, stub: spb_grpc.SchedulerStub) -> None:
        self._stub = stub
        self._requests: dict[str, RequestEvents] = {}  # in flight on the current call
        self._outbox: asyncio.Queue[spb.StreamRequest | None] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    def generate(self, request: spb.GenerateRequest, timeout_s: float) -> RequestEvents:
        """Sends the request on the call (opening it if needed); never blocks."""
        rid = request.request_id
        if rid in self._requests:
            raise InvalidRequest(f"request {rid!r} is already in flight")
        self._ensure_call()
        events = RequestEvents(self, rid, request.sampling.n, timeout_s)
        self._requests[rid] = events
        self._outbox.put_nowait(spb.StreamRequest(generate=request))
        return events

    def abort(self, request_id: str) -> None:
        """Aborts the request at the scheduler, in order after its Generate message.

        Without a live call there is nothing to abort: the scheduler aborts a broken call's
        requests itself."""
        self.forget(request_id)
        if self._reader is not None and not self._reader.done():
            abort = spb.AbortRequest(request_id=request_id)
            self._outbox.put_nowait(spb.StreamRequest(abort=abort))

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def _ensure_call(self) -> None:
        if self._reader is not None and not self._reader.done():
            return
        self._outbox = asyncio.Queue()
        call = self._stub.Stream(_drain(self._outbox))
        # A fresh context: the reader outlives the request that opened the call, and must not
        # log under its id.
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(call), context=contextvars.Context())

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for batch in call:
                self._dispatch(batch)
            error: GatewayError = Unavailable("the scheduler ended the stream")
        except grpc.RpcError as err:
            error = from_rpc_error(err, "scheduler")
        except asyncio.CancelledError:
            call.cancel()
            self._fail_all(Unavailable("the gateway is shutting down"))
            raise
        self._fail_all(error)

    def _dispatch(self, batch: spb.StreamBatch) -> None:
        for msg in batch.events:
            rid, item = convert.stream_event_from_pb(msg)
            events = self._requests.get(rid)
            if events is None:  # cancelled by the gateway meanwhile
                continue
            if events.put(item):
                del self._requests[rid]

    def _fail_all(self, error: GatewayError) -> None:
        requests, self._requests = self._requests, {}
        if requests:
            log.warning("scheduler stream broke with %d requests on it: %s", len(requests), error)
        for events in requests.values():
            events.put(error)


def with_ends(chunks: list[TokenChunk], ends: list[SampleEnd | GatewayError]) -> list[Item]:
    """The events in order, each sample's end attached to its chunk when it has one."""
    by_index = {c.index: i for i, c in enumerate(chunks)}
    out: list[Item] = list(chunks)
    for end in ends:
        at = by_index.pop(end.index, None) if isinstance(end, SampleEnd) else None
        if at is None:
            out.append(end)
        else:
            out[at] = replace(chunks[at], end=end)
    return out


def merge_chunks(a: TokenChunk, b: TokenChunk) -> TokenChunk:
    """`b` appended to `a` (same sample): its tokens after a's, its cumulative counts."""
    return replace(
        b,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        top_ids=a.top_ids + b.top_ids,
        top_logprobs=a.top_logprobs + b.top_logprobs,
    )


async def _drain(
    outbox: asyncio.Queue[spb.StreamRequest | None],
) -> AsyncIterator[spb.StreamRequest]:
    while (msg := await outbox.get()) is not None:
        yield msg
