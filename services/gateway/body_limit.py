"""The request body limit (--max-request-bytes), enforced before the body is read.

A Content-Length past the limit is answered 413 at once, without reading a byte of the body. A body
sent without one (chunked) is counted as it arrives: the chunk that crosses the limit raises
RequestTooLarge inside the route's read, so the one exception handler answers 413 and the rest is
never read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.errors import RequestTooLarge, error_response


class BodyLimit:
    """ASGI middleware refusing HTTP bodies longer than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(self.too_large(declared))(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def too_large(self, size: int | None) -> RequestTooLarge:
        got = f" ({size} bytes)" if size is not None else ""
        return RequestTooLarge(
            f"the request body{got} is longer than the limit of {self.max_bytes} bytes"
        )

    def _counting(self, receive: Receive) -> Receive:
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.too_large(None)
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                return None  # h11 refuses it first; counting the body still applies
            return int(value) if len(value) <= 18 else 10**18  # int() of 5,000 digits raises
    return None
