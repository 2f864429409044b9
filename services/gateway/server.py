"""`radixserve gateway`: the OpenAI-compatible HTTP server (uvicorn).

SIGTERM / SIGINT stop accepting connections; in-flight requests get --shutdown-grace-s to finish,
after which they are cancelled (and so aborted at their scheduler). The process then exits 0.

With --ssl-keyfile and --ssl-certfile it serves HTTPS only (TLS in uvicorn).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from services.common.log import setup_logging
from services.common.tracing import instrument_asgi
from services.gateway.app import build_app
from services.gateway.config import GatewayConfig


class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Like uvicorn's, but without re-raising the signal afterwards (which exits -15)."""
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(cfg: GatewayConfig) -> None:
    log = setup_logging("gateway", cfg)
    log.info("tokenizer %s, scheduler %s", ", ".join(cfg.tokenizer), ", ".join(cfg.scheduler))
    config = uvicorn.Config(
        instrument_asgi(build_app(cfg)),
        host=cfg.host,
        port=cfg.port,
        log_config=None,
        access_log=cfg.access_log,
        timeout_graceful_shutdown=cfg.shutdown_grace_s,
        timeout_keep_alive=30,
        http="httptools",  # HTTP/1.1 parsed in C: a large or hostile body costs the loop little
        loop="asyncio",  # the gRPC clients' asyncio integration
        ssl_keyfile=cfg.ssl_keyfile,
        ssl_certfile=cfg.ssl_certfile,
    )
    Server(config).run()
