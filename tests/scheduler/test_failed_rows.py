"""A row whose sampling fails fails its own request only: the others in the same steps finish
with the tokens they get alone (the executor's test-only fault injection, a real engine)."""

from __future__ import annotations

import asyncio
import random

from services.scheduler.streams import Failure
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model
from tests.scheduler.harness import collect, params, running_scheduler
from tests.scheduler.local_executor import LocalExecutor

MAX_TOKENS = 6


def test_a_failing_row_fails_only_its_request() -> None:
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
        engine.fault_request_id = "bad"
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
    after = results.pop("after")
    assert not isinstance(after, Failure) and after[0].tokens == alone["ok-0"][:3]
    for rid, result in results.items():
        assert not isinstance(result, Failure), (rid, result)
        assert result[0].tokens == alone[rid], rid
