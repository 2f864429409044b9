"""`radixserve scheduler`: connect to the executor, then serve the Scheduler service.

Health reports SERVING only while the executor is connected and warmed up (the scheduler loop
flips it when the connection is made, lost, or made again). The loop recovers from every
failure on its own; should it ever end anyway, the process exits non-zero instead of serving on
with nothing to run requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.log import setup_logging
from services.common.metrics import serve_metrics, service_registry
from services.scheduler.config import SchedulerConfig
from services.scheduler.executor_client import ExecutorClient
from services.scheduler.scheduler import Scheduler
from services.scheduler.servicer import SchedulerServicer

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
LOOP_DIED_EXIT_CODE = 3


async def serve(cfg: SchedulerConfig) -> None:
    log = setup_logging("scheduler", cfg)
    registry = service_registry()
    server = GrpcServer(cfg.host, cfg.port, [SERVICE_NAME], metrics=registry)
    link = ExecutorClient(cfg.executor)
    scheduler = Scheduler(cfg, link, on_serving=server.set_serving, registry=registry)
    server.register(
        scheduler_pb2_grpc.add_SchedulerServicer_to_server, SchedulerServicer(scheduler)
    )
    port = await server.start()
    log.info("listening on %s:%d (connecting to the executor at %s)", cfg.host, port, cfg.executor)
    metrics = serve_metrics(registry, cfg.host, cfg.metrics_port, log)
    loop_task = asyncio.create_task(scheduler.run())
    loop_task.add_done_callback(_exit_unless_cancelled)
    try:
        await server.wait_for_termination()
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await link.close()
        if metrics is not None:
            metrics.close()


def _exit_unless_cancelled(task: asyncio.Task) -> None:
    """`Scheduler.run` only ends by cancellation; anything else would leave health SERVING and
    requests queued forever, so the process ends and its supervisor restarts it."""
    if task.cancelled():
        return
    exc = task.exception()
    logging.getLogger("radixserve.scheduler").critical(
        "the scheduler loop ended (%r); exiting", exc, exc_info=exc
    )
    os._exit(LOOP_DIED_EXIT_CODE)


def main(cfg: SchedulerConfig) -> None:
    asyncio.run(serve(cfg))
