"""Free TCP ports on 127.0.0.1 for the services a process starts (`radixserve serve`, the test
harness, the tensor-parallel rendezvous)."""

from __future__ import annotations

import socket
import threading

_given: set[int] = set()
_lock = threading.Lock()


def reserve(ports: list[int]) -> None:
    """Marks `ports` (fixed ones a caller has promised to a service: `serve --port`, the
    `--metrics-port` range) as handed out, so `free_port` never picks one of them for another
    service of this process."""
    with _lock:
        _given.update(ports)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now that this process has not handed out before.

    The port comes from binding port 0 and closing the socket, so the kernel may give the same
    port again before the service it was picked for binds it: two such picks in a row can
    collide, and gRPC servers bind with SO_REUSEPORT unless told otherwise (ours are: see
    grpc_server.SERVER_OPTIONS), so two services would once have shared one port and split its
    connections. Ports handed out earlier are therefore never handed out again. Another process
    can still take the port first; the service then fails to bind, loudly."""
    with _lock:
        while True:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port
