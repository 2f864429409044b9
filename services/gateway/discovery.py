"""Where the engines are: `--scheduler` targets, static or found by DNS.

A target `host:port` is one engine. A target `dns:///name:port` (gRPC's name syntax) is every
address `name` resolves to — all its A and AAAA records, each `ip:port` one engine — looked up
again every `--discovery-refresh-s`; in Kubernetes, `name` is the engines' headless Service,
whose records are the ready engine pods, so engines the autoscaler adds or removes join or leave
the routing within one refresh. A lookup that fails keeps the addresses of the last one that
succeeded (a DNS hiccup does not empty the pool).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("radixserve.gateway")
DNS_PREFIX = "dns:///"
# host, port -> the IP addresses it resolves to (raises OSError when it cannot).
Resolver = Callable[[str, int], Awaitable[list[str]]]


def split_host_port(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); raises ValueError naming the target."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{target!r} is not host:port")
    return host.strip("[]"), int(port)


def check_target(target: str) -> None:
    """Raises ValueError unless `target` is `host:port` or `dns:///host:port`."""
    split_host_port(target.removeprefix(DNS_PREFIX))


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(host: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address of `host` (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class Discovery:
    """The current engine addresses of a list of targets."""

    def __init__(self, targets: list[str], resolver: Resolver = resolve) -> None:
        for target in targets:
            check_target(target)
        self.targets, self._resolver = targets, resolver
        self._last: dict[str, list[str]] = {}  # DNS target -> its addresses at the last lookup
        self._errors: dict[str, str] = {}

    @property
    def dynamic(self) -> bool:
        return any(t.startswith(DNS_PREFIX) for t in self.targets)

    async def addresses(self) -> list[str]:
        """Every engine address, in target order, without duplicates."""
        found: list[str] = []
        for target in self.targets:
            for address in await self._addresses_of(target):
                if address not in found:
                    found.append(address)
        return found

    async def _addresses_of(self, target: str) -> list[str]:
        if not target.startswith(DNS_PREFIX):
            return [target]
        host, port = split_host_port(target.removeprefix(DNS_PREFIX))
        try:
            ips = await self._resolver(host, port)
        except OSError as exc:
            if self._errors.get(target) != str(exc):
                log.warning("cannot resolve %s (%s); keeping its last addresses", target, exc)
            self._errors[target] = str(exc)
            return self._last.get(target, [])
        self._errors.pop(target, None)
        addresses = [join_host_port(ip, port) for ip in ips]
        if addresses != self._last.get(target):
            log.info("%s resolves to %s", target, ", ".join(addresses) or "nothing")
        self._last[target] = addresses
        return addresses
