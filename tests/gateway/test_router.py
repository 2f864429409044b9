"""Least-loaded routing over scheduler replicas."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.errors import Unavailable
from services.gateway.router import SchedulerLoad, SchedulerRouter


class Replica:
    def __init__(self, address: str, running: int = 0, waiting: int = 0, up: bool = True) -> None:
        self.address, self.running, self.waiting, self.up = address, running, waiting, up

    async def load(self) -> SchedulerLoad:
        if not self.up:
            raise Unavailable(f"the scheduler at {self.address} is unavailable")
        return SchedulerLoad(self.address, self.running, self.waiting, 100, 10)


def routed(replicas: list[Replica], picks: list[int]) -> list[str]:
    router = SchedulerRouter(replicas, refresh_s=1.0)  # type: ignore[arg-type]
    asyncio.run(router.refresh())
    return [router.pick(n).address for n in picks]


def test_least_loaded_wins() -> None:
    replicas = [Replica("a", running=5), Replica("b", running=1, waiting=2), Replica("c", 9)]
    assert routed(replicas, [1]) == ["b"]


def test_samples_sent_since_the_poll_count_as_load() -> None:
    replicas = [Replica("a", running=2), Replica("b", running=0)]
    assert routed(replicas, [1, 1, 1, 4, 1]) == ["b", "b", "a", "b", "a"]


def test_unreachable_replicas_are_skipped() -> None:
    replicas = [Replica("a", up=False), Replica("b", running=50)]
    assert routed(replicas, [1, 1]) == ["b", "b"]


def test_no_reachable_replica_is_unavailable() -> None:
    router = SchedulerRouter([Replica("a", up=False)], refresh_s=1.0)  # type: ignore[list-item]
    asyncio.run(router.refresh())
    with pytest.raises(Unavailable, match="no scheduler is reachable: a: the scheduler at a"):
        router.pick(1)
    assert router.loads() == []
