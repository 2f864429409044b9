"""`radixserve tokenizer`: load the tokenizer, then serve the Tokenizer service."""

from __future__ import annotations

import asyncio

from radixserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.log import setup_logging
from services.common.metrics import serve_metrics, service_registry
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.tokenizer import Tokenizer

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


async def serve(cfg: TokenizerConfig) -> None:
    log = setup_logging("tokenizer", cfg)
    servicer = TokenizerServicer()
    registry = service_registry()
    server = GrpcServer(cfg.host, cfg.port, [SERVICE_NAME], metrics=registry)
    server.register(tokenizer_pb2_grpc.add_TokenizerServicer_to_server, servicer)
    port = await server.start()
    log.info("listening on %s:%d (loading the tokenizer)", cfg.host, port)
    metrics = serve_metrics(registry, cfg.host, cfg.metrics_port, log)
    loop = asyncio.get_running_loop()
    try:
        tokenizer = await loop.run_in_executor(
            servicer.pool, Tokenizer.load, cfg.model_path, cfg.chat_template
        )
    except BaseException:
        await server.server.stop(0)
        if metrics is not None:
            metrics.close()
        raise
    servicer.tokenizer = tokenizer
    await server.set_serving(True)
    log.info("serving %s on %s:%d", tokenizer.info.model_path, cfg.host, port)
    await server.wait_for_termination()
    servicer.pool.shutdown(wait=False)
    if metrics is not None:
        metrics.close()


def main(cfg: TokenizerConfig) -> None:
    asyncio.run(serve(cfg))
