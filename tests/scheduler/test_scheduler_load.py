"""Mixed loads on the model-free checking executor: every token right, every slot accounted for.

The fake executor re-verifies the KV chain of every row it computes, so a slot freed too early, a
stale table entry or a missed write fails the step; `debug_checks` runs check_integrity() after
every step. Outputs are compared with what each prompt produces alone.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.scheduler.fake_executor import FakeExecutor
from tests.scheduler.harness import running_scheduler, wait_idle
from tests.scheduler.workload import Spec, random_specs, run_all

CONFIGS = {
    "default": ({}, 4096, 32),
    "small-pool": ({"chunked_prefill_size": 48}, 400, 32),
    "small-pool-no-overlap": ({"disable_overlap_schedule": True}, 400, 32),
    "no-radix-cache": ({"disable_radix_cache": True, "chunked_prefill_size": 32}, 500, 16),
    "fcfs-few-rows": ({"schedule_policy": "fcfs", "max_running_requests": 4}, 1024, 16),
}


async def _run_load(
    cfg: dict, slots: int, rows: int, specs: list[Spec], timeout: float
) -> FakeExecutor:
    fake = FakeExecutor(slots, rows, delay=0.0005)
    async with running_scheduler(fake, **cfg) as sched:
        await run_all(sched, specs, timeout)
        await wait_idle(sched)
        load = sched.load()
        assert fake.errors == []
        assert load.counters.integrity_checks >= load.counters.steps
        assert sched.flush_cache() == load.kv.evictable
        assert sched.load().kv.free == slots
    return fake


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mixed_load_matches_reference(name: str) -> None:
    cfg, slots, rows = CONFIGS[name]
    specs = random_specs(random.Random(name), 60)
    asyncio.run(_run_load(cfg, slots, rows, specs, timeout=60))


def test_long_mixed_load_stays_consistent() -> None:
    """A few hundred requests through a tight pool: retractions, chunking, aborts, n > 1."""
    specs = random_specs(random.Random(9), 300, max_prompt=80, max_tokens=40)
    specs = [Spec(**{**s.__dict__, "delay": s.delay * 20}) for s in specs]  # arrivals over ~1 s

    async def main() -> None:
        fake = FakeExecutor(600, 32, delay=0.0005)
        async with running_scheduler(fake, chunked_prefill_size=64) as sched:
            await run_all(sched, specs, timeout=120)
            await wait_idle(sched)
            counters = sched.load().counters
        assert fake.errors == []
        assert counters.retractions > 0 and counters.cached_tokens > 0
        assert counters.integrity_checks >= counters.steps

    asyncio.run(main())


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict, int, list[Spec]]:
    seed = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(1, 24))
    cfg = {
        "disable_overlap_schedule": draw(st.booleans()),
        "disable_radix_cache": draw(st.booleans()),
        "chunked_prefill_size": draw(st.sampled_from([8, 32, 2048])),
        "schedule_policy": draw(st.sampled_from(["lpm", "fcfs"])),
        "max_running_requests": draw(st.integers(1, 8)),
    }
    slots = draw(st.integers(140, 600))  # the longest request needs 120
    return cfg, slots, random_specs(random.Random(seed), count)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads(workload: tuple[dict, int, list[Spec]]) -> None:
    cfg, slots, specs = workload
    asyncio.run(_run_load(cfg, slots, 8, specs, timeout=60))
