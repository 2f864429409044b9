"""A row whose sampling or forward pass fails fails its own request only: the others in the same
steps finish with the tokens they get alone (the executor's test-only fault injection, a real
engine), and no KV the failed forward left unwritten is ever read from the prefix cache."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.scheduler.cache import CacheStats
from services.scheduler.streams import Failure
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model
from tests.scheduler.harness import collect, params, running_scheduler, wait_idle
from tests.scheduler.local_executor import LocalExecutor

MAX_TOKENS = 6


@pytest.mark.parametrize("stage", ["sample", "forward"])
def test_a_failing_row_fails_only_its_request(stage: str) -> None:
    hf = hf_model("llama")
    rng = random.Random(4)
    prompts = {f"ok-{i}": [rng.randrange(250) for _ in range(5 + i)] for i in range(7)}
    prompts["bad"] = [7, 8, 9]
    driver = Driver(engine_for(hf, num_slots=4096, max_rows=4))
    alone = {}
    for rid, prompt in prompts.items():
        driver.next_slot = 1
        alone[rid] = driver.generate([prompt], MAX_TOKENS)[0].output

    async def main() -> dict:
        engine = engine_for(hf, num_slots=4096, max_rows=16)
        engine.fault_request_id, engine.fault_stage = "bad", stage
        async with running_scheduler(LocalExecutor(engine)) as sched:
            streams = {
                rid: sched.submit(params(rid, p, MAX_TOKENS, ignore_eos=True))
                for rid, p in prompts.items()
            }
            results = {rid: await collect(s) for rid, s in streams.items()}
            after = await collect(
                sched.submit(params("after", prompts["ok-0"], 3, ignore_eos=True))
            )
        results["after"] = after
        return results

    results = asyncio.run(main())
    bad = results.pop("bad")
    assert isinstance(bad, Failure) and bad.code == 13 and "InjectedFault" in bad.message
    cause = {"sample": "sampling failed", "forward": "the forward pass failed"}[stage]
    assert bad.message.startswith(cause), bad.message
    after = results.pop("after")
    assert not isinstance(after, Failure) and after[0].tokens == alone["ok-0"][:3]
    for rid, result in results.items():
        assert not isinstance(result, Failure), (rid, result)
        assert result[0].tokens == alone[rid], rid


def test_a_failed_prefill_is_never_read_from_the_cache() -> None:
    """The failing request's prompt enters the prefix cache when its step is built; requests
    sharing that prefix admitted before the failure is known match it. They are retracted and
    computed again, and end with the tokens they get alone; the cache keeps none of the garbage
    (integrity is checked after every step, and every slot comes back)."""
    hf = hf_model("llama")
    rng = random.Random(5)
    prefix = [rng.randrange(250) for _ in range(24)]
    prompts = {
        "bad": [*prefix, 3, 4],
        "shared-0": [*prefix, 5, 6, 7],
        "shared-1": [*prefix, 8],
        "other": [rng.randrange(250) for _ in range(9)],
    }
    driver = Driver(engine_for(hf, num_slots=4096, max_rows=4))
    alone = {}
    for rid, prompt in prompts.items():
        driver.next_slot = 1
        alone[rid] = driver.generate([prompt], MAX_TOKENS)[0].output

    async def main() -> tuple[dict, int, CacheStats]:
        engine = engine_for(hf, num_slots=4096, max_rows=16)
        engine.fault_request_id, engine.fault_stage = "bad", "forward"
        # "bad" fills the first step alone; the next is built before its result comes.
        budget = len(prompts["bad"])
        link = LocalExecutor(engine)
        async with running_scheduler(
            link, chunked_prefill_size=budget, schedule_policy="fcfs"
        ) as sched:
            streams = {
                rid: sched.submit(params(rid, p, MAX_TOKENS, ignore_eos=True))
                for rid, p in prompts.items()
            }
            results = {rid: await collect(s) for rid, s in streams.items()}
            await wait_idle(sched)
            return results, sched.counters.retractions, sched.cache.stats()

    results, retractions, stats = asyncio.run(main())
    bad = results.pop("bad")
    assert isinstance(bad, Failure) and bad.message.startswith("the forward pass failed"), bad
    for rid, result in results.items():
        assert not isinstance(result, Failure), (rid, result)
        assert result[0].tokens == alone[rid], rid
    assert retractions >= 1  # a request had matched the unwritten prefix
    assert stats.protected == 0 and stats.free + stats.evictable == stats.total, stats
