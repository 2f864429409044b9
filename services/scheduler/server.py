"""`radixserve scheduler`: connect to the executor, then serve the Scheduler service.

Health reports SERVING only while the executor is connected and warmed up (the scheduler loop
flips it when the connection is made, lost, or made again).
"""

from __future__ import annotations

import asyncio
import contextlib

from radixserve.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.log import setup_logging
from services.scheduler.config import SchedulerConfig
from services.scheduler.executor_client import ExecutorClient
from services.scheduler.scheduler import Scheduler
from services.scheduler.servicer import SchedulerServicer

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


async def serve(cfg: SchedulerConfig) -> None:
    log = setup_logging("scheduler")
    server = GrpcServer(cfg.host, cfg.port, [SERVICE_NAME])
    link = ExecutorClient(cfg.executor)
    scheduler = Scheduler(cfg, link, on_serving=server.set_serving)
    server.register(
        scheduler_pb2_grpc.add_SchedulerServicer_to_server, SchedulerServicer(scheduler)
    )
    port = await server.start()
    log.info("listening on %s:%d (connecting to the executor at %s)", cfg.host, port, cfg.executor)
    loop_task = asyncio.create_task(scheduler.run())
    try:
        await server.wait_for_termination()
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await link.close()


def main(cfg: SchedulerConfig) -> None:
    asyncio.run(serve(cfg))
