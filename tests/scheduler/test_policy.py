"""Queue order (lpm / fcfs, retracted first) and the hold-back of requests sharing a prefix."""

from __future__ import annotations

import asyncio

import pytest

from services.scheduler.cache import KVCache
from services.scheduler.policy import LPM_MAX_QUEUE, LPM_MIN_OVERTAKE, Policy, PrefixesInFlight
from services.scheduler.request import Req, SamplingOptions, StopOptions
from services.scheduler.streams import OutputStream


def req(prompt: list[int], arrival: int, retracted: bool = False) -> Req:
    stream = OutputStream(1, len(prompt), False)
    r = Req("r", 0, prompt, SamplingOptions(), StopOptions(), frozenset(), 0, stream, arrival)
    r.retracted = retracted
    return r


def cache_with(*prefixes: list[int]) -> KVCache:
    cache = KVCache(1000)
    for ids in prefixes:
        kv = cache.allocate(len(ids))
        assert kv is not None
        cache.tree.insert(ids, kv)
    return cache


@pytest.fixture(autouse=True)
def _loop():
    # OutputStream makes an asyncio.Event, which wants a current loop on Python 3.10.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    loop.close()


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("lpm", [3, 2, 0, 1]),  # retracted first, then the longest cached prefix, then arrival
        ("fcfs", [3, 0, 1, 2]),
    ],
)
def test_order(policy: str, expected: list[int]) -> None:
    cache = cache_with([1, 2, 3, 4, 5, 6])
    waiting = [
        req([9, 9, 9], 0),
        req([7, 7], 1),
        req([1, 2, 3, 4, 8], 2),
        req([5, 5], 3, retracted=True),
    ]
    order = Policy(policy, cache).order(waiting)
    assert [r.arrival for r in order] == expected


def test_lpm_falls_back_to_fcfs_on_a_long_queue() -> None:
    cache = cache_with([1, 2, 3])
    waiting = [req([9, 9], i) for i in range(LPM_MAX_QUEUE)] + [req([1, 2, 3, 4], LPM_MAX_QUEUE)]
    assert Policy("lpm", cache).order(waiting)[-1].arrival == LPM_MAX_QUEUE
    assert Policy("lpm", cache).order(waiting[1:])[0].arrival == LPM_MAX_QUEUE


def test_lpm_without_cache_is_fcfs() -> None:
    cache = KVCache(100, disable=True)
    waiting = [req([1, 2], 1), req([1, 2, 3], 0)]
    assert [r.arrival for r in Policy("lpm", cache).order(waiting)] == [0, 1]


@pytest.mark.parametrize(
    ("computing", "prompt", "cached", "held"),
    [
        (list(range(100)), [*range(80), 500], 0, True),  # 80 shared, uncached tokens
        (list(range(100)), [*range(80), 500], 80, False),  # already cached: nothing to wait for
        (list(range(100)), list(range(10)) + [500] * 50, 0, False),  # 10 < 32 shared of 60
        (list(range(100)), list(range(6)), 0, True),  # the whole uncached prompt is shared
        (list(range(100)), [500] * 40, 0, False),
    ],
)
def test_hold_back(computing: list[int], prompt: list[int], cached: int, held: bool) -> None:
    in_flight = PrefixesInFlight(enabled=True)
    in_flight.add(req(computing, 0))
    assert in_flight.should_hold(req(prompt, 1), cached) is held
    assert PrefixesInFlight(enabled=False).should_hold(req(prompt, 1), cached) is False


@pytest.mark.parametrize("ahead", [0, 3, 20])
def test_lpm_lets_a_request_be_overtaken_a_bounded_number_of_times(ahead: int) -> None:
    """A request with no cached prefix, behind a steady stream of cache hits: lpm puts it
    behind them until half the requests waiting when it came (at least LPM_MIN_OVERTAKE) went
    ahead, then first."""
    cache = cache_with([1, 2, 3, 4, 5, 6])
    policy = Policy("lpm", cache)
    waiting = [req([1, 2, 3, 4, 5, 6, 100 + i], -ahead + i) for i in range(ahead)]
    cold = req([9, 9, 9], 0)
    policy.note_arrived([cold], waiting)
    waiting.append(cold)
    bound = max(LPM_MIN_OVERTAKE, ahead // 2)
    arrival, later_admitted = 1, 0
    while True:
        waiting.append(req([1, 2, 3, 4, 5, 6, arrival], arrival))  # a cache hit arrives
        arrival += 1
        first = policy.order(waiting)[0]
        waiting.remove(first)
        policy.note_admitted([first], waiting)
        if first is cold:
            break
        later_admitted += first.arrival > cold.arrival
        assert later_admitted <= bound, "the cold request waited past the bound"
    assert later_admitted == bound  # the cache hits did go first until then
    assert all(r.arrival > cold.arrival for r in waiting)  # and everything ahead of it too


def test_priority_policy_orders_by_priority_then_arrival() -> None:
    cache = cache_with([1, 2, 3])
    waiting = [req([1, 2, 3, 4], 0), req([9], 1), req([8], 2), req([7], 3, retracted=True)]
    waiting[0].priority, waiting[1].priority, waiting[2].priority = 5, -1, 5
    order = Policy("priority", cache).order(waiting)
    assert [r.arrival for r in order] == [3, 1, 0, 2]  # retracted, then -1, then 5 by arrival
