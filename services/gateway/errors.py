"""Typed errors of the gateway and the one place they become HTTP responses.

Every failure a client can see is a `GatewayError` carrying its HTTP status and OpenAI error
`type` / `code`. gRPC statuses from the tokenizer and schedulers are turned into these in
`from_status`; `error_response` renders any exception as OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("radixserve.gateway")

_STATUS_BY_NUMBER = {s.value[0]: s for s in grpc.StatusCode}


class GatewayError(Exception):
    """Base of the errors clients see; subclasses pick the status and the OpenAI type."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        if code is not None:
            self.code = code


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", None


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(GatewayError):
    """The body is longer than --max-request-bytes."""

    status, type, code = 413, "invalid_request_error", "request_too_large"


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Busy(GatewayError):
    """The operation needs an idle server: a cache flush while requests are in flight (400, as
    SGLang answers)."""

    status, type, code = 400, "invalid_request_error", "server_busy"


class Overloaded(GatewayError):
    """A scheduler's waiting queue is full: retry later."""

    status, type, code = 503, "server_error", "queue_full"


class RateLimited(GatewayError):
    """A key's requests or tokens per minute ran out (--api-key-file): retry after some seconds.
    `kind` is OpenAI's error type for it: "requests" or "tokens"."""

    status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.type, self.retry_after_s = kind, retry_after_s


class Unavailable(GatewayError):
    """A downstream service cannot be reached or is not ready."""

    status, type, code = 503, "server_error", "service_unavailable"


class Timeout(GatewayError):
    status, type, code = 504, "server_error", "timeout"


def from_status(code: grpc.StatusCode | int, details: str, service: str) -> GatewayError:
    """The gateway error for a gRPC status returned by `service` ("tokenizer", "scheduler")."""
    if isinstance(code, int):
        code = _STATUS_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,  # a request id (/generate's rid) already in flight
    ):
        return InvalidRequest(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return Busy(f"the {service} is busy: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"the server is overloaded: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the {service} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Timeout(f"the {service} did not answer in time")
    return GatewayError(f"the {service} failed ({code.name}): {details}")


def from_rpc_error(err: grpc.RpcError, service: str) -> GatewayError:
    return from_status(err.code(), err.details() or "", service)  # type: ignore[attr-defined]


def error_body(message: str, type_: str, param: str | None, code: str | int | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: BaseException) -> tuple[int, dict]:
    """The one mapping from an exception to its HTTP status and OpenAI error body."""
    if isinstance(exc, GatewayError):
        if exc.status >= 500:
            log.warning("%d %s: %s", exc.status, exc.code, exc.message)
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "unknown_url" if exc.status_code == 404 else None  # OpenAI's code for a bad route
        return exc.status_code, error_body(str(exc.detail), kind, None, code)
    log.error("unexpected error", exc_info=exc)
    return 500, error_body("internal server error", "server_error", None, "internal_error")


class ErrorResponse(JSONResponse):
    """JSON as ASCII: an error quoting the client's input (a model name holding a lone
    surrogate, say) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    """`error_payload` as a response; a full queue or a rate limit adds Retry-After, and a body too large closes
    the connection (so the server stops receiving the rest of it rather than read it to the end
    to keep the connection alive)."""
    status, body = error_payload(exc)
    headers = dict(exc.headers or {}) if isinstance(exc, HTTPException) else {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, RequestTooLarge):
        headers["Connection"] = "close"
    return ErrorResponse(body, status, headers=headers)
