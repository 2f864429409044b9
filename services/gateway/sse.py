"""Server-sent events: `data: <json>` per chunk, an error event if the stream fails, `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from services.gateway.errors import error_payload
from services.gateway.events import Output, Usage
from services.gateway.responses import Format

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(body: Any) -> bytes:
    return (
        b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def sse_stream(
    fmt: Format, outputs: AsyncIterator[Output], usage: Callable[[], Usage]
) -> AsyncIterator[bytes]:
    """The SSE body of one streamed response; `usage` gives the request's usage so far."""
    for body in fmt.opening(usage()):
        yield event(body)
    try:
        async for out in outputs:
            body = fmt.chunk(out, usage())
            for one in body if isinstance(body, list) else [body] if body is not None else []:
                yield event(one)
    except Exception as exc:  # the status line is gone: the error becomes the last event
        yield event(error_payload(exc)[1])
    else:
        for body in fmt.closing(usage()):
            yield event(body)
    yield DONE
