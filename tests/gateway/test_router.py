"""Routing over scheduler replicas: the policies, the prefix index, discovery by DNS."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.config import GatewayConfig
from services.gateway.errors import Unavailable
from services.gateway.router import SchedulerLoad, SchedulerRouter
from services.gateway.routing import PAGE_TOKENS, PrefixIndex, RoutingConfig


class Replica:
    def __init__(self, address: str, running: int = 0, waiting: int = 0, up: bool = True) -> None:
        self.address, self.running, self.waiting, self.up = address, running, waiting, up
        self.closed = False

    async def load(self) -> SchedulerLoad:
        if not self.up:
            raise Unavailable(f"the scheduler at {self.address} is unavailable")
        return SchedulerLoad(self.address, self.running, self.waiting, 100, 10)

    async def close(self) -> None:
        self.closed = True


def router_of(replicas: list[Replica], policy: str = "least_load", **kw: object) -> SchedulerRouter:
    by_address = {r.address: r for r in replicas}
    routing = RoutingConfig(policy, **kw)  # type: ignore[arg-type]
    router = SchedulerRouter(list(by_address), 1.0, by_address.__getitem__, routing)  # type: ignore[arg-type]
    asyncio.run(router.refresh())
    return router


def routed(replicas: list[Replica], picks: list[int], policy: str = "least_load") -> list[str]:
    router = router_of(replicas, policy)
    return [router.pick(n).address for n in picks]


def prompt(conversation: int, length: int) -> list[int]:
    """Token ids of one conversation's prompt: its first `length` tokens (a growing prefix)."""
    return [1000 * conversation + i for i in range(length)]


def test_least_loaded_wins() -> None:
    replicas = [Replica("a:1", running=5), Replica("b:1", running=1, waiting=2), Replica("c:1", 9)]
    assert routed(replicas, [1]) == ["b:1"]


def test_samples_sent_since_the_poll_count_as_load() -> None:
    replicas = [Replica("a:1", running=2), Replica("b:1", running=0)]
    assert routed(replicas, [1, 1, 1, 4, 1]) == ["b:1", "b:1", "a:1", "b:1", "a:1"]


@pytest.mark.parametrize("policy", ["cache_aware", "least_load", "power_of_two", "round_robin"])
def test_unreachable_replicas_are_skipped(policy: str) -> None:
    replicas = [Replica("a:1", up=False), Replica("b:1", running=50)]
    assert routed(replicas, [1, 1], policy) == ["b:1", "b:1"]


def test_no_reachable_replica_is_unavailable() -> None:
    router = router_of([Replica("a:1", up=False)])
    with pytest.raises(Unavailable, match="no scheduler is reachable: a:1: the scheduler at a:1"):
        router.pick(1)
    assert router.loads() == []


def test_round_robin_takes_each_in_turn() -> None:
    replicas = [Replica("a:1", running=9), Replica("b:1"), Replica("c:1")]
    assert routed(replicas, [1] * 5, "round_robin") == ["a:1", "b:1", "c:1", "a:1", "b:1"]


def test_power_of_two_never_takes_the_busier_of_its_pair() -> None:
    replicas = [Replica("a:1", running=100), Replica("b:1")]  # with two, the pair is both
    assert set(routed(replicas, [1] * 20, "power_of_two")) == {"b:1"}


def test_cache_aware_keeps_each_conversation_on_its_engine() -> None:
    router = router_of([Replica("a:1"), Replica("b:1")], "cache_aware")
    first = {c: router.pick(1, prompt(c, 100)).address for c in range(6)}
    assert sorted(first.values()) == ["a:1"] * 3 + ["b:1"] * 3  # new prefixes spread out
    for turn in (2, 3, 4):
        for c in range(6):
            assert router.pick(1, prompt(c, 100 * turn)).address == first[c]


def test_cache_aware_needs_the_match_to_cover_the_threshold() -> None:
    router = router_of([Replica("a:1"), Replica("b:1")], "cache_aware", cache_threshold=0.5)
    home = router.pick(1, prompt(7, 64)).address
    # 64 of 160 tokens match (0.4 < 0.5): routed as a new prefix, to the emptier engine.
    assert router.pick(1, prompt(7, 160)).address != home


def test_cache_aware_falls_back_to_least_load_when_out_of_balance() -> None:
    busy, idle = Replica("a:1", running=100), Replica("b:1", running=0)
    router = router_of([busy, idle], "cache_aware", balance_abs_threshold=10)
    for conversation in (1, 2):  # a holds both conversations...
        router._indexes["a:1"].insert(prompt(conversation, 200))
    assert router.pick(1, prompt(1, 300)).address == "b:1"  # ...but is far busier
    busy.running = 5  # within 10 samples of b: balanced again
    asyncio.run(router.refresh())
    assert router.pick(1, prompt(2, 300)).address == "a:1"
    assert router.pick(1, prompt(1, 400)).address == "b:1"  # where its longest prefix went


def test_a_hot_conversation_cannot_pin_all_traffic() -> None:
    """Every request continues one conversation, each adding a sample that stays running:
    once one engine is out of balance the rest go elsewhere, bounded by the thresholds."""
    router = router_of([Replica("a:1"), Replica("b:1")], "cache_aware", balance_abs_threshold=8)
    counts = {"a:1": 0, "b:1": 0}
    for turn in range(60):
        counts[router.pick(1, prompt(3, 50 + turn)).address] += 1
    assert min(counts.values()) >= 20 and abs(counts["a:1"] - counts["b:1"]) <= 10, counts


def test_prefix_index_matches_whole_pages_and_trims_least_recent() -> None:
    index = PrefixIndex(max_tokens=4 * PAGE_TOKENS)
    index.insert(prompt(1, 2 * PAGE_TOKENS + 5))  # two full pages; the partial one is not kept
    assert index.size == 2 * PAGE_TOKENS
    assert index.match(prompt(1, 10 * PAGE_TOKENS)) == 2 * PAGE_TOKENS
    assert index.match(prompt(2, 10 * PAGE_TOKENS)) == 0
    index.insert(prompt(2, 3 * PAGE_TOKENS))  # 5 pages > 4: conversation 1's last page goes
    assert index.size == 4 * PAGE_TOKENS
    assert index.match(prompt(1, 3 * PAGE_TOKENS)) == PAGE_TOKENS
    assert index.match(prompt(2, 3 * PAGE_TOKENS)) == 3 * PAGE_TOKENS


class FakeDns:
    """A resolver whose answer the test changes."""

    def __init__(self, ips: list[str]) -> None:
        self.ips, self.lookups, self.fail = ips, 0, False

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("engines.local", 30003)
        self.lookups += 1
        if self.fail:
            raise OSError("temporary failure in name resolution")
        return list(self.ips)


def test_dns_discovery_follows_the_answer() -> None:
    replicas: dict[str, Replica] = {}

    def make(address: str) -> Replica:
        return replicas.setdefault(address, Replica(address))

    dns = FakeDns(["10.0.0.1"])
    router = SchedulerRouter(
        ["dns:///engines.local:30003"],
        0.01,
        make,
        RoutingConfig("round_robin"),
        0.05,
        dns,  # type: ignore[arg-type]
    )

    async def main() -> None:
        await router.refresh()
        assert [router.pick(1).address for _ in range(3)] == ["10.0.0.1:30003"] * 3
        dns.ips = ["10.0.0.1", "10.0.0.2"]
        await router.refresh()  # within the discovery interval: the old answer still holds
        assert {router.pick(1).address for _ in range(4)} == {"10.0.0.1:30003"}
        await asyncio.sleep(0.06)
        await router.refresh()
        assert {router.pick(1).address for _ in range(4)} == {"10.0.0.1:30003", "10.0.0.2:30003"}
        dns.ips = ["10.0.0.2"]
        await asyncio.sleep(0.06)
        await router.refresh()
        assert {router.pick(1).address for _ in range(4)} == {"10.0.0.2:30003"}
        assert [c.address for c in router.clients] == ["10.0.0.2:30003"]
        dns.fail = True  # a failed lookup keeps the last answer
        await asyncio.sleep(0.06)
        await router.refresh()
        assert router.pick(1).address == "10.0.0.2:30003"
        dns.fail, dns.ips = False, []
        await asyncio.sleep(0.06)
        await router.refresh()
        with pytest.raises(Unavailable, match="lists no engine"):
            router.pick(1)
        await router.close()

    asyncio.run(main())
    assert dns.lookups == 5
    assert all(r.closed for r in replicas.values())  # a client that left is closed at the end


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("scheduler", ["nohost"], "--scheduler"),
        ("scheduler", ["dns:///engines"], "--scheduler"),
        ("routing_policy", "random", "--routing-policy"),
        ("cache_threshold", 1.5, "--cache-threshold"),
        ("balance_rel_threshold", 0.5, "--balance-rel-threshold"),
    ],
)
def test_routing_flags_are_validated(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayConfig(**{option: value})  # type: ignore[arg-type]


def test_a_prefix_shared_by_all_traffic_does_not_leave_an_engine_idle() -> None:
    """Every prompt starts with the same 32-token system prompt: it is cached where the first
    request went, but once that engine's rows are taken the next ones go to the idle engine."""
    full = Replica("a:1")
    replicas = {r.address: r for r in (full, Replica("b:1"))}

    async def load(r: Replica = full) -> SchedulerLoad:
        return SchedulerLoad(r.address, r.running, r.waiting, 100, 10, max_running_requests=4)

    for r in replicas.values():
        r.load = lambda r=r: load(r)  # type: ignore[method-assign]
    router = SchedulerRouter(list(replicas), 1.0, replicas.__getitem__, RoutingConfig())  # type: ignore[arg-type]
    asyncio.run(router.refresh())
    system = list(range(32))
    first = [router.pick(1, [*system, 1000 + i]).address for i in range(8)]
    assert first == ["a:1"] * 4 + ["b:1"] * 4  # four rows each, then b caches the prompt too


@pytest.mark.parametrize(
    ("waiting", "kv_used", "room"),
    [
        (0, 10, True),  # nothing queued
        (1, 10, True),  # one request between steps: the next step admits it
        (1, 95, False),  # queued behind a full KV cache
        (0, 95, True),  # full KV, but nothing waits for it
    ],
)
def test_only_a_held_back_queue_takes_an_engines_room(
    waiting: int, kv_used: int, room: bool
) -> None:
    """A prompt cached on `a` stays there while `a` merely has a request between steps; it goes
    to the idle `b` when `a`'s queue is held back by a full KV cache."""
    a, b = Replica("a:1", running=1, waiting=waiting), Replica("b:1")

    async def load(r: Replica) -> SchedulerLoad:
        used = kv_used if r is a else 10
        return SchedulerLoad(r.address, r.running, r.waiting, 100, used, max_running_requests=8)

    for r in (a, b):
        r.load = lambda r=r: load(r)  # type: ignore[method-assign]
    router = SchedulerRouter(["a:1", "b:1"], 1.0, {"a:1": a, "b:1": b}.__getitem__, RoutingConfig())  # type: ignore[arg-type]
    asyncio.run(router.refresh())
    router._indexes["a:1"].insert(prompt(1, 64))
    assert router.pick(1, prompt(1, 80)).address == ("a:1" if room else "b:1")
