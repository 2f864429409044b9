"""A Scheduler and its servicer on a real in-process gRPC server (no executor process)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from radixserve.v1 import scheduler_pb2_grpc as pb_grpc
from services.scheduler.executor_client import ExecutorLink
from services.scheduler.scheduler import Scheduler
from services.scheduler.servicer import SchedulerServicer
from tests.scheduler.harness import running_scheduler


@contextlib.asynccontextmanager
async def scheduler_server(
    link: ExecutorLink, **cfg: object
) -> AsyncIterator[tuple[Scheduler, grpc.aio.Server, str]]:
    """(scheduler, server, "127.0.0.1:port"); the server is stopped on exit if still running."""
    async with running_scheduler(link, **cfg) as sched:
        server = grpc.aio.server()
        pb_grpc.add_SchedulerServicer_to_server(SchedulerServicer(sched), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            yield sched, server, f"127.0.0.1:{port}"
        finally:
            await server.stop(0)
