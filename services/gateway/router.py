"""Spreads requests over the scheduler replicas: the least loaded by a periodically polled GetLoad.

Between two polls the router counts the samples it sent to each replica itself, so a burst does
not all land on the replica that looked idle at the last poll. A replica whose GetLoad fails is
left out until a later poll reaches it again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.gateway.errors import GatewayError, Unavailable

if TYPE_CHECKING:
    from services.gateway.clients import SchedulerClient

log = logging.getLogger("radixserve.gateway")
POLL_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SchedulerLoad:
    """One replica's GetLoad snapshot: what routing needs of it."""

    address: str
    num_running: int
    num_waiting: int
    kv_slots_total: int
    kv_slots_used: int


class SchedulerRouter:
    def __init__(self, clients: list[SchedulerClient], refresh_s: float) -> None:
        assert clients, "at least one scheduler"
        self.clients = clients
        self.refresh_s = refresh_s
        self._loads: dict[str, SchedulerLoad | None] = {c.address: None for c in clients}
        self._sent: dict[str, int] = {c.address: 0 for c in clients}  # samples since the poll
        self._errors: dict[str, str] = {c.address: "not polled yet" for c in clients}

    async def refresh(self) -> None:
        """Polls every replica's load at once."""
        results = await asyncio.gather(*(self._poll(c) for c in self.clients))
        for client, load in zip(self.clients, results, strict=True):
            self._loads[client.address] = load
            self._sent[client.address] = 0

    async def run(self) -> None:
        """Refreshes forever (a background task)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.refresh_s)

    def pick(self, num_samples: int) -> SchedulerClient:
        """The reachable replica with the fewest running, waiting and just-sent samples."""
        reachable = [c for c in self.clients if self._loads[c.address] is not None]
        if not reachable:
            raise Unavailable(f"no scheduler is reachable: {self.unreachable_reason()}")
        client = min(reachable, key=self._score)
        self._sent[client.address] += num_samples
        return client

    def loads(self) -> list[SchedulerLoad]:
        """The latest snapshot of every reachable replica."""
        return [load for load in self._loads.values() if load is not None]

    def unreachable_reason(self) -> str:
        return "; ".join(f"{addr}: {err}" for addr, err in self._errors.items() if err)

    def _score(self, client: SchedulerClient) -> int:
        load = self._loads[client.address]
        assert load is not None
        return load.num_running + load.num_waiting + self._sent[client.address]

    async def _poll(self, client: SchedulerClient) -> SchedulerLoad | None:
        try:
            load = await asyncio.wait_for(client.load(), POLL_TIMEOUT_S)
        except (GatewayError, asyncio.TimeoutError) as exc:
            reason = str(exc) or "GetLoad timed out"
            if self._errors[client.address] != reason:
                log.warning("scheduler %s unreachable: %s", client.address, reason)
            self._errors[client.address] = reason
            return None
        self._errors[client.address] = ""
        return load
