"""The check an idle scheduler runs: slot counts by default, every slot with --debug-checks."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from services.scheduler.cache import KVCache
from tests.scheduler.fake_executor import FakeExecutor
from tests.scheduler.harness import running_scheduler, wait_idle
from tests.scheduler.workload import random_specs, run_all


def owner(kv: list[int], num_cached: int = 0) -> SimpleNamespace:
    """What check_counts reads of a running request: its slots and how many are the tree's."""
    return SimpleNamespace(kv=kv, num_cached=num_cached)


def test_counts_hold_for_free_cached_and_owned_slots() -> None:
    cache = KVCache(100)
    cached = cache.allocate(10)
    assert cached is not None
    cache.tree.insert(list(range(10)), cached)
    owned = cache.allocate(7)
    assert owned is not None
    cache.check_counts([owner(cached + owned, num_cached=10)])
    cache.allocator.free(owned)
    cache.check_counts([])
    cache.check_integrity([])  # the full check agrees


def test_counts_catch_a_leaked_and_a_twice_freed_slot() -> None:
    cache = KVCache(50)
    leaked = cache.allocate(3)
    assert leaked is not None
    with pytest.raises(AssertionError, match="KV slots leaked: 47 free"):
        cache.check_counts([])  # three slots neither free, cached nor owned
    cache.allocator.free(leaked)
    cache.allocator._free.append(leaked[0])  # freed twice
    with pytest.raises(AssertionError, match="51 free"):
        cache.check_counts([])


@pytest.mark.parametrize("debug", [False, True])
def test_idle_scheduler_runs_the_check_its_flag_asks_for(
    debug: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"full": 0, "counts": 0}
    full, counts = KVCache.check_integrity, KVCache.check_counts

    def count_full(self: KVCache, running: object) -> None:
        calls["full"] += 1
        full(self, running)

    def count_counts(self: KVCache, running: object) -> None:
        calls["counts"] += 1
        counts(self, running)

    monkeypatch.setattr(KVCache, "check_integrity", count_full)
    monkeypatch.setattr(KVCache, "check_counts", count_counts)

    async def main() -> None:
        fake = FakeExecutor(400, 8, delay=0.0005)
        async with running_scheduler(fake, debug_checks=debug) as sched:
            await run_all(sched, random_specs(random.Random(3), 12), 30)
            await wait_idle(sched)
            assert fake.errors == []
            assert sched.load().counters.integrity_checks >= 1
            assert sched.load().kv.free + sched.load().kv.evictable == 400

    asyncio.run(main())
    if debug:
        assert calls["full"] >= 1 and calls["counts"] == 0
    else:
        assert calls["counts"] >= 1 and calls["full"] == 0
