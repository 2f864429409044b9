"""Running the generations of one HTTP request into a JSON body or an SSE stream.

Errors before the first output (a full queue, a bad request the scheduler refused) raise, so
they get their HTTP status; a streamed response starts only once the first output exists. A
client that disconnects — while waiting, or mid-stream — aborts its requests at the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.gateway.errors import GatewayError
from services.gateway.events import Output, Usage
from services.gateway.generation import Generation
from services.gateway.request_log import record_of
from services.gateway.responses import Format, join_outputs
from services.gateway.sse import HEADERS, sse_stream

T = TypeVar("T")


class ClientGone(GatewayError):
    """The client closed the connection; nobody reads this response."""

    status, type, code = 499, "invalid_request_error", "client_closed_request"


class Run:
    """The generations of one HTTP request (one per prompt) as one stream of outputs.

    Choice indexes of prompt k are k * n .. k * n + n - 1.
    """

    def __init__(self, generations: list[Generation], n: int) -> None:
        self.generations, self.n = generations, n

    @property
    def num_choices(self) -> int:
        return len(self.generations) * self.n

    @property
    def usage(self) -> Usage:
        return sum((g.usage for g in self.generations), Usage())

    @property
    def schedulers(self) -> list[str]:
        """The addresses of the schedulers the generations went to (one per prompt, deduplicated
        in order)."""
        return list(dict.fromkeys(g.scheduler.address for g in self.generations))

    @property
    def first_token_at(self) -> float | None:
        """time.monotonic() of the first output token of any generation (None: none yet)."""
        times = [g.metrics.first_token_at for g in self.generations]
        return min((t for t in times if t is not None), default=None)

    def abort(self) -> None:
        for g in self.generations:
            g.abort()

    def outputs(self) -> AsyncIterator[Output]:
        if len(self.generations) == 1:
            return self.generations[0].outputs()
        return self._merged()

    async def _merged(self) -> AsyncIterator[Output]:
        queue: asyncio.Queue[Output | Exception | None] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._pump(k, g, queue)) for k, g in enumerate(self.generations)
        ]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, k: int, gen: Generation, queue: asyncio.Queue) -> None:
        try:
            async for out in gen.outputs():
                out.index += k * self.n
                await queue.put(out)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)


async def respond(request: Request, run: Run, fmt: Format, stream: bool) -> Response:
    if not stream:
        collected = await collect(request, run)
        return JSONResponse(fmt.response(join_outputs(collected, run.num_choices), run.usage))
    record_of(request).run = run
    outputs = run.outputs()
    first = await unless_disconnected(request, run, anext(outputs, None))
    body = sse_stream(fmt, _prepend(first, outputs), lambda: run.usage)
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)


async def collect(request: Request, run: Run) -> list[Output]:
    """Every output of `run`, the request's record (request log, token charges) pointing at it;
    aborted at once if the client disconnects first."""
    record_of(request).run = run
    return await unless_disconnected(request, run, _collect(run.outputs()))


async def unless_disconnected(request: Request, run: Run, work: Awaitable[T]) -> T:
    """Awaits `work`; if the client disconnects first, cancels it, aborts `run` and raises."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            run.abort()
    if not task.done():
        raise ClientGone("the client disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(outputs: AsyncIterator[Output]) -> list[Output]:
    return [out async for out in outputs]


async def _prepend(first: Any, rest: AsyncIterator[Output]) -> AsyncIterator[Output]:
    if first is None:
        return
    yield first
    async for out in rest:
        yield out
