"""Typed errors of the scheduler's API and the one table mapping them to gRPC status codes."""

from __future__ import annotations

import grpc


class SchedulerError(Exception):
    """Base of the errors a client can cause or see; `code` is the gRPC status it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(SchedulerError, ValueError):
    """The request can never run as sent (bad field, too long for the context)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QueueFull(SchedulerError):
    """The waiting queue is at --max-queued-requests (the gateway answers 503)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DuplicateRequest(SchedulerError):
    """A request with this id is already queued or running."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotReady(SchedulerError):
    """The executor is not connected (starting, or reconnecting after losing it)."""

    code = grpc.StatusCode.UNAVAILABLE


class Busy(SchedulerError):
    """The operation needs an idle scheduler (FlushCache while requests are in flight)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ExecutorLost(Exception):
    """The executor's step stream broke; every running request is lost with it."""


class StepTimeout(ExecutorLost):
    """A sent step's result did not come within --step-timeout-s: the executor is wedged."""


def status_of(exc: BaseException) -> grpc.StatusCode:
    return exc.code if isinstance(exc, SchedulerError) else grpc.StatusCode.INTERNAL
