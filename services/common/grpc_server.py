"""Shared gRPC plumbing: server start-up with health and reflection, graceful stop, channels."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.metrics import GrpcServerMetrics
from services.common.tracing import client_interceptors, server_interceptors

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_SIZES = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Clients ping every 30 s so a dead peer is noticed on long-lived streams (the step stream, a
# slow generation); servers must accept pings that often, or they answer GOAWAY too_many_pings.
CHANNEL_OPTIONS = [
    *_SIZES,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Without SO_REUSEPORT a second server on a taken port fails to bind, instead of sharing the port
# and answering half of its connections with another service's methods.
SERVER_OPTIONS = [
    *_SIZES,
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

log = logging.getLogger("radixserve.grpc")


class GrpcServer:
    """An asyncio gRPC server with the standard health and reflection services (and a span per
    traced call when tracing is on: services/common/tracing.py).

    `register` adds the service's own servicers; `service_names` are the fully qualified names
    reflected and reported by the health service (NOT_SERVING until `set_serving(True)`). With a
    `metrics` registry, every call is counted and timed in it (grpc_server_*, services/common/metrics.py).
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_names: Iterable[str],
        metrics: CollectorRegistry | None = None,
    ) -> None:
        interceptors = server_interceptors()
        if metrics is not None:  # outermost: counts every call, traced or not
            interceptors.insert(0, GrpcServerMetrics(metrics))
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        self.host, self.port = host, port
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)

    def register(self, add_fn: Callable[[object, grpc.aio.Server], None], servicer: object) -> None:
        add_fn(servicer, self.server)

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> int:
        """Binds host:port (port 0: one the kernel picks) and starts serving; returns the port.
        Raises OSError when the port cannot be bound (taken by another process, say)."""
        try:
            bound = self.server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError as e:  # grpcio raises where older versions returned 0
            raise OSError(f"cannot bind gRPC server to {self.host}:{self.port}: {e}") from e
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {self.host}:{self.port}")
        self.port = bound
        await self.server.start()
        await self.set_serving(False)
        return bound

    async def wait_for_termination(self, grace_s: float = 5.0) -> None:
        """Serves until SIGTERM/SIGINT, then stops gracefully (in-flight RPCs get `grace_s`)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(self.server.wait_for_termination())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping (grace %.1fs)", grace_s)
        await self.set_serving(False)
        await self.server.stop(grace_s)
        stopper.cancel()


def insecure_channel(address: str, *, round_robin: bool = False) -> grpc.aio.Channel:
    """A client channel; `round_robin` spreads calls over every address a name resolves to
    (e.g. `dns:///tokenizer-headless:30001`) instead of sticking to the first one. With tracing
    on, unary calls get a span and send its context along."""
    options = list(CHANNEL_OPTIONS)
    if round_robin:
        options.append(("grpc.lb_policy_name", "round_robin"))
    return grpc.aio.insecure_channel(address, options=options, interceptors=client_interceptors())
