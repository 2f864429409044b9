"""Ports for the services a process starts: never the same one twice, and a taken port fails to
bind instead of being shared by two gRPC servers."""

from __future__ import annotations

import asyncio
import re

import pytest

from services.cli import build_parser
from services.common import ports
from services.common.grpc_server import GrpcServer
from services.serve import wiring


class _Kernel:
    """A stand-in for socket.socket whose bind to port 0 yields the given ports in turn, as the
    kernel may: a port closed a moment ago can come back at once."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = picks

    def __call__(self) -> _Kernel:
        return self

    def __enter__(self) -> _Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        assert address[1] == 0
        self.port = self.picks.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_skips_a_port_it_already_gave(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_given", set())
    monkeypatch.setattr(ports.socket, "socket", _Kernel([41001, 41001, 41001, 41002]))
    assert ports.free_port() == 41001
    assert ports.free_port() == 41002


def test_serve_wires_every_service_to_a_port_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the kernel offers each port again right after it was closed."""
    monkeypatch.setattr(ports, "_given", set())
    picks = [p for p in range(42001, 42008) for _ in range(3)]
    monkeypatch.setattr(ports.socket, "socket", _Kernel(picks))
    args = build_parser().parse_args(["serve", "--dp-size", "3"])
    internal = [wires["port"] for name, _, wires in wiring(args) if name != "gateway"]
    assert sorted(internal) == list(
        range(42001, 42008)
    )  # a tokenizer; an executor, a scheduler each


def test_serve_never_picks_its_fixed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel offers the gateway's and the metrics ports first: serve skips them."""
    monkeypatch.setattr(ports, "_given", set())
    fixed = [43000, 43100, 43101, 43102]  # --port, then the tokenizer's, executor's, scheduler's
    monkeypatch.setattr(ports.socket, "socket", _Kernel([*fixed, 43001, 43002, 43003]))
    args = build_parser().parse_args(["serve", "--port", "43000", "--metrics-port", "43100"])
    children = wiring(args)
    internal = sorted(wires["port"] for name, _, wires in children if name != "gateway")
    assert internal == [43001, 43002, 43003]
    assert {name: wires.get("metrics_port") for name, _, wires in children} == {
        "tokenizer": 43100,
        "executor": 43101,
        "scheduler": 43102,
        "gateway": None,
    }


def test_a_taken_port_fails_to_bind() -> None:
    async def main() -> str:
        first = GrpcServer("127.0.0.1", ports.free_port(), ["radixserve.Tokenizer"])
        port = await first.start()
        second = GrpcServer("127.0.0.1", port, ["radixserve.Scheduler"])
        try:
            with pytest.raises(OSError) as raised:
                await second.start()
            return str(raised.value)
        finally:
            await first.server.stop(None)
            await second.server.stop(None)

    message = asyncio.run(main())
    assert re.search(r"cannot bind gRPC server to 127\.0\.0\.1:\d+", message)
