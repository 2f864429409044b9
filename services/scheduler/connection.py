"""One caller's multiplexed Stream: its requests, and the events they have for it, in batches.

The scheduler loop never waits on a caller: each request's OutputStream tells the connection it
has events (`on_event`), the connection marks it ready and sets `wake`. The RPC handler then
`take`s everything every ready request has in one batch — one message per step, or several
steps' worth coalesced when the caller reads slower than the loop produces.
"""

from __future__ import annotations

import asyncio

from services.scheduler.errors import DuplicateRequest, SchedulerError, status_of
from services.scheduler.request import GenerateParams
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Event, Failure, OutputStream

# (request_id, event), in the order they happened.
Batch = list[tuple[str, Event]]


class StreamConnection:
    """The requests one Stream call submitted and has not seen end yet.

    Single event loop, no locks: `generate` / `abort` run from the handler's reader task, the
    loop's pushes arrive through `on_event`, `take` from the handler's writer.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.streams: dict[str, OutputStream] = {}  # request_id -> its stream, until taken done
        self._ready: dict[str, None] = {}  # request ids with events to take, in order
        self._refused: Batch = []  # admission failures, sent with the next batch
        self.wake = asyncio.Event()

    def generate(self, params: GenerateParams) -> None:
        """Submits the request; a refusal becomes its `error` event instead of an exception."""
        rid = params.request_id
        try:
            if rid in self.streams:
                raise DuplicateRequest(f"request {rid!r} is already in flight")
            self.streams[rid] = self.scheduler.submit(params, lambda: self._mark(rid))
        except SchedulerError as exc:
            self.refuse(rid, exc)

    def refuse(self, request_id: str, exc: SchedulerError) -> None:
        """Answers a request that never ran with the status Generate would have returned."""
        self._refused.append((request_id, Failure(status_of(exc).value[0], str(exc))))
        self.wake.set()

    def abort(self, request_id: str) -> None:
        """Aborts one of this call's requests (other callers' ids are not touched)."""
        if request_id in self.streams:
            self.scheduler.abort(request_id)

    def take(self) -> Batch:
        """Every pending event of every request; requests that ended are forgotten."""
        batch, self._refused = self._refused, []
        for rid in self._ready:
            stream = self.streams.get(rid)
            if stream is None:  # closed meanwhile
                continue
            batch += [(rid, event) for event in stream.take()]
            if stream.done:
                del self.streams[rid]
        self._ready.clear()
        self.wake.clear()
        return batch

    def close(self) -> None:
        """The caller went away: abort what it still has running, freeing its KV at once."""
        for rid, stream in list(self.streams.items()):
            if not stream.done:
                self.scheduler.abort(rid)
        self.streams.clear()

    def _mark(self, request_id: str) -> None:
        self._ready[request_id] = None
        self.wake.set()
