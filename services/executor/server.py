"""`radixserve executor`: load the model, warm up, then serve the Executor service."""

from __future__ import annotations

import asyncio
import time

from radixserve.v1 import executor_pb2, executor_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.log import setup_logging
from services.common.metrics import serve_metrics, service_registry
from services.executor.config import ExecutorConfig
from services.executor.factory import create_engine
from services.executor.servicer import ExecutorServicer, Watchdog

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["Executor"].full_name


async def serve(cfg: ExecutorConfig) -> None:
    log = setup_logging("executor", cfg)
    watchdog = Watchdog(cfg.watchdog_timeout_s)
    registry = service_registry()
    servicer = ExecutorServicer(watchdog, registry)
    server = GrpcServer(cfg.host, cfg.port, [SERVICE_NAME], metrics=registry)
    server.register(executor_pb2_grpc.add_ExecutorServicer_to_server, servicer)
    port = await server.start()
    log.info("listening on %s:%d (loading the model)", cfg.host, port)
    metrics = serve_metrics(registry, cfg.host, cfg.metrics_port, log)
    loop = asyncio.get_running_loop()
    try:
        loaded = await loop.run_in_executor(servicer.worker, create_engine, cfg)
        servicer.loaded = loaded
        started = time.monotonic()
        warmups = [loop.run_in_executor(servicer.worker, loaded.engine.warmup)]
        if loaded.engine.grammar is not None:  # the tokenizer, so the first grammar is quick
            warmups.append(loop.run_in_executor(servicer.compiler, loaded.engine.grammar.preload))
        await asyncio.gather(*warmups)
    except BaseException:
        await server.server.stop(0)
        if servicer.loaded is not None:
            servicer.loaded.close()
        if metrics is not None:
            metrics.close()
        raise
    log.info("warmed up in %.1fs", time.monotonic() - started)
    servicer.metrics.bind(loaded.served_name)
    servicer.ready = True
    watchdog.start()
    await server.set_serving(True)
    log.info("serving %s on %s:%d", loaded.served_name, cfg.host, port)
    await server.wait_for_termination()
    loaded.close()  # the other tensor-parallel ranks, after the last step
    if metrics is not None:
        metrics.close()


def main(cfg: ExecutorConfig) -> None:
    asyncio.run(serve(cfg))
