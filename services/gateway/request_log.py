"""Request ids and the request log of the generation routes (the `RequestLog` middleware).

Every request to a generation route has an id: its `X-Request-Id` header (1 to 128 printable ASCII
characters, else a 400), or a new one (`chatcmpl-…`, `cmpl-…`, `gen-…`); /generate's `rid` field
replaces either. The id is the answer's `id` and the request's id at the scheduler and executor
(`<id>-<k>` for prompt k of a batched completion, `<id>/<i>` for sample i in the executor), comes
back as the `X-Request-Id` header of every response of these routes (streams and errors too;
not for a `rid` that is no valid header value, such as one with non-ASCII characters), and tags
every gateway log line written while the request is handled.

With --log-requests each of these requests logs one line once its response has ended, also after
an error or a client that went away: method, route, status (499 when the response was cut off
before its end), prompt / completion / cached tokens, the scheduler(s) it was routed to, time to
the first token when one came, and the latency.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.log import REQUEST_ID
from services.gateway.auth import KEY_SCOPE
from services.gateway.errors import InvalidRequest, error_response

if TYPE_CHECKING:
    from services.gateway.respond import Run

HEADER = "X-Request-Id"
MAX_ID_CHARS = 128
CUT_OFF = 499  # the status logged for a response that never reached its end (nginx's)
SCOPE_KEY = "radixserve.request"
log = logging.getLogger("radixserve.gateway.requests")


def new_request_id(prefix: str) -> str:
    """An id for a response and its scheduler request, e.g. chatcmpl-0f3c…"""
    return f"{prefix}-{uuid.uuid4().hex}"


def valid_request_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_CHARS and all(" " <= c <= "~" for c in value)


@dataclass
class RequestRecord:
    """One request to a generation route, as the request log reports it."""

    request_id: str
    arrived: float  # time.monotonic()
    run: Run | None = None  # the request's generations, once the route made them
    status: int | None = None  # of the response, once it started
    ended: bool = False  # the response's last byte was sent

    def fields(self, scope: Scope) -> dict[str, Any]:
        """The request log line's values."""
        usage = self.run.usage if self.run is not None else None
        first = self.run.first_token_at if self.run is not None else None
        fields: dict[str, Any] = {
            "method": scope["method"],
            "route": scope["path"],
            "status": self.status if self.ended else CUT_OFF,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
        }
        if self.run is not None:
            fields["scheduler"] = ",".join(self.run.schedulers)
        if first is not None:
            fields["ttft_ms"] = _ms(first - self.arrived)
        fields["latency_ms"] = _ms(time.monotonic() - self.arrived)
        return fields


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def record_of(request: Request) -> RequestRecord:
    return request.scope[SCOPE_KEY]


def request_id(request: Request, chosen: str | None = None) -> str:
    """The request's id; `chosen` (/generate's `rid`) replaces it from here on."""
    record = record_of(request)
    if chosen is not None:
        record.request_id = chosen
        REQUEST_ID.set(chosen)  # in the middleware's task, which restores the variable at the end
    return record.request_id


class RequestLog:
    """ASGI middleware giving each request to the paths in `id_prefixes` (path -> prefix of new
    ids) its id, the id's response header, and with `log_requests` its request log line."""

    def __init__(self, app: ASGIApp, id_prefixes: dict[str, str], log_requests: bool) -> None:
        self.app, self.id_prefixes, self.log_requests = app, id_prefixes, log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        prefix = self.id_prefixes.get(scope["path"]) if scope["type"] == "http" else None
        if prefix is None:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get(HEADER)
        invalid = header is not None and not valid_request_id(header)
        rid = new_request_id(prefix) if header is None or invalid else header
        record = scope[SCOPE_KEY] = RequestRecord(rid, time.monotonic())
        token = REQUEST_ID.set(record.request_id)
        state = scope["app"].state
        state.server_load = getattr(state, "server_load", 0) + 1  # GET /load

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if valid_request_id(record.request_id):  # a `rid` need not fit in a header
                    MutableHeaders(scope=message).append(HEADER, record.request_id)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record.ended = True
            await send(message)

        try:
            if invalid:
                raise InvalidRequest(
                    f"the {HEADER} header must be 1 to {MAX_ID_CHARS} printable ASCII characters",
                    param=HEADER,
                )
            await self.app(scope, receive, stamped)
        except Exception as exc:
            if record.status is not None:
                raise
            # Starlette answers an unexpected error outside every middleware: answered here, the
            # 500 (or this middleware's 400) carries the request id, and so does its log line.
            await error_response(exc)(scope, receive, stamped)
        finally:
            state.server_load -= 1
            _charge_tokens(scope, record)
            if self.log_requests:
                fields = record.fields(scope)
                log.info(
                    "request finished", extra={"request_id": record.request_id, "fields": fields}
                )
            REQUEST_ID.reset(token)


def _charge_tokens(scope: Scope, record: RequestRecord) -> None:
    """Charges the request's prompt and completion tokens to the API key it was admitted under
    (per-key tokens per minute, see `rate_limits`)."""
    key = scope.get(KEY_SCOPE)
    usage = record.run.usage if record.run is not None else None
    if key is not None and usage is not None:
        scope["app"].state.rate_limiter.add_tokens(
            key, usage.prompt_tokens + usage.completion_tokens
        )
