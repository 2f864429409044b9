"""Spreads requests over the engines (scheduler replicas): which ones exist (discovery.py), how
loaded each is (a periodically polled GetLoad), and which one a request goes to (routing.py;
`--routing-policy`, cache-aware by default).

Between two polls the router counts the samples it sent to each engine itself, so a burst does
not all land on the engine that looked idle at the last poll. An engine whose GetLoad fails is
left out until a later poll reaches it again. An engine that discovery no longer lists takes no
new requests; its client stays open for the requests it is finishing (and for its return).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.gateway.discovery import Discovery, Resolver, resolve
from services.gateway.errors import GatewayError, Unavailable
from services.gateway.routing import Candidate, Policy, PrefixIndex, RoutingConfig

if TYPE_CHECKING:
    from services.gateway.clients import SchedulerClient

log = logging.getLogger("radixserve.gateway")
POLL_TIMEOUT_S = 2.0
KV_FULL_SHARE = 0.9  # KV use past which an engine's waiting queue counts as held back


@dataclass(frozen=True)
class SchedulerLoad:
    """One replica's GetLoad snapshot: what routing needs of it."""

    address: str
    num_running: int
    num_waiting: int
    kv_slots_total: int
    kv_slots_used: int
    max_running_requests: int = 0  # 0: not reported


class SchedulerRouter:
    """`targets` are --scheduler's (static `host:port` or `dns:///name:port`); `make_client`
    makes the client of one address."""

    def __init__(
        self,
        targets: list[str],
        refresh_s: float,
        make_client: Callable[[str], SchedulerClient],
        routing: RoutingConfig | None = None,
        discovery_refresh_s: float = 5.0,
        resolver: Resolver = resolve,
    ) -> None:
        assert targets, "at least one scheduler"
        self.refresh_s, self.discovery_refresh_s = refresh_s, discovery_refresh_s
        self.routing = routing or RoutingConfig()
        self._discovery = Discovery(targets, resolver)
        self._make_client = make_client
        self._policy = Policy(self.routing)
        self._clients: dict[str, SchedulerClient] = {}  # every address ever listed
        self._listed: list[str] = []
        self._discovered_at = -float("inf")
        self._loads: dict[str, SchedulerLoad | None] = {}
        self._sent: dict[str, int] = {}  # samples sent since the last poll
        self._errors: dict[str, str] = {}
        self._indexes: dict[str, PrefixIndex] = {}
        if not self._discovery.dynamic:  # static targets: listed from the start
            self._set_listed(list(dict.fromkeys(targets)))

    @property
    def clients(self) -> list[SchedulerClient]:
        """The engines listed now (by the static targets and the last DNS lookups)."""
        return [self._clients[a] for a in self._listed]

    async def discover(self) -> None:
        """Looks the DNS targets up again (a no-op for static targets)."""
        self._discovered_at = time.monotonic()
        if self._discovery.dynamic:
            self._set_listed(await self._discovery.addresses())

    async def refresh(self) -> None:
        """Re-discovers when due, then polls every listed engine's load at once."""
        if time.monotonic() - self._discovered_at >= self.discovery_refresh_s:
            await self.discover()
        clients = self.clients
        results = await asyncio.gather(*(self._poll(c) for c in clients))
        for client, load in zip(clients, results, strict=True):
            if client.address in self._loads:  # still listed after the await
                self._loads[client.address] = load
                self._sent[client.address] = 0

    async def run(self) -> None:
        """Refreshes forever (a background task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    def pick(self, num_samples: int, input_ids: Sequence[int] = ()) -> SchedulerClient:
        """The engine for a request of `num_samples` samples with prompt `input_ids` (none: a
        probe, routed by load alone), by --routing-policy among the reachable engines."""
        candidates = [
            Candidate(a, self._score(a), self._indexes[a], self._has_room(a))
            for a in self._listed
            if self._loads[a] is not None
        ]
        if not candidates:
            raise Unavailable(f"no scheduler is reachable: {self.unreachable_reason()}")
        chosen = self._policy.choose(candidates, input_ids)
        self._sent[chosen.address] += num_samples
        return self._clients[chosen.address]

    def loads(self) -> list[SchedulerLoad]:
        """The latest snapshot of every reachable listed engine."""
        return [load for load in self._loads.values() if load is not None]

    def unreachable_reason(self) -> str:
        if not self._listed:
            return f"{', '.join(self._discovery.targets)} lists no engine"
        return "; ".join(f"{addr}: {err}" for addr, err in self._errors.items() if err)

    def _set_listed(self, addresses: list[str]) -> None:
        gone = [a for a in self._listed if a not in addresses]
        for address in gone:
            log.info("scheduler %s left the routing", address)
            for table in (self._loads, self._sent, self._errors, self._indexes):
                table.pop(address, None)
        for address in addresses:
            if address not in self._loads:
                if address not in self._clients:
                    self._clients[address] = self._make_client(address)
                self._loads[address] = None
                self._sent[address] = 0
                self._errors[address] = "not polled yet"
                self._indexes[address] = PrefixIndex(self.routing.max_tree_size)
        self._listed = list(addresses)

    def _has_room(self, address: str) -> bool:
        """Whether a new sample would run at once there: a free row, and no queue that is held
        back. A queue the next step admits (rows free, KV not nearly full) is not held back: a
        request waits there for one step whenever it arrives mid-step."""
        load = self._loads[address]
        assert load is not None
        rows = load.max_running_requests  # 0: not reported, so only the queue says
        if rows and self._score(address) >= rows:
            return False
        kv_full = load.kv_slots_used >= KV_FULL_SHARE * load.kv_slots_total
        return not load.num_waiting or (bool(rows) and not kv_full)

    def _score(self, address: str) -> int:
        load = self._loads[address]
        assert load is not None
        return load.num_running + load.num_waiting + self._sent[address]

    async def _poll(self, client: SchedulerClient) -> SchedulerLoad | None:
        try:
            load = await asyncio.wait_for(client.load(), POLL_TIMEOUT_S)
        except (GatewayError, asyncio.TimeoutError) as exc:
            reason = str(exc) or "GetLoad timed out"
            if self._errors.get(client.address) != reason:
                log.warning("scheduler %s unreachable: %s", client.address, reason)
            if client.address in self._errors:
                self._errors[client.address] = reason
            return None
        if client.address in self._errors:
            self._errors[client.address] = ""
        return load
