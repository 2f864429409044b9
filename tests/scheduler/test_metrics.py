"""The scheduler's Prometheus series agree with the traffic it ran (model-free executor)."""

from __future__ import annotations

import asyncio
import random

from prometheus_client import CollectorRegistry

from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from tests.scheduler.fake_executor import FakeExecutor
from tests.scheduler.harness import collect, params, running_scheduler, wait_idle
from tests.scheduler.workload import Spec, random_specs, run_all

MODEL = {"model_name": "fake"}


def value(sched: Scheduler, name: str) -> float:
    sample = sched.registry.get_sample_value(name, MODEL)
    assert sample is not None, f"{name} is not exported"
    return sample


def test_series_follow_the_requests() -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, i] for i in range(10, 20)]  # one shared prefix of 8

    async def main() -> Scheduler:
        async with running_scheduler(FakeExecutor(4096, 32)) as sched:
            streams = [sched.submit(params(f"r{i}", p, 6)) for i, p in enumerate(prompts)]
            results = [await collect(s) for s in streams]
            await wait_idle(sched)
        assert all(r[0].complete is not None for r in results)  # type: ignore[index]
        return sched

    sched = asyncio.run(main())
    c = sched.load().counters
    total = sum(map(len, prompts))
    assert value(sched, "radixserve:prompt_tokens_total") == c.prompt_tokens == total
    assert value(sched, "radixserve:prefix_cache_queries_total") == total
    assert value(sched, "radixserve:prefix_cache_hits_total") == c.cached_tokens > 0
    assert value(sched, "radixserve:generation_tokens_total") == 10 * 6
    assert value(sched, "radixserve:num_preemptions_total") == 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(sched, f"radixserve:{gauge}") == 0
    assert value(sched, "radixserve:request_prompt_tokens_count") == 10
    assert value(sched, "radixserve:request_prompt_tokens_sum") == total
    assert value(sched, "radixserve:request_generation_tokens_sum") == 10 * 6
    for stage in ("queue", "prefill", "decode", "inference"):
        assert value(sched, f"radixserve:request_{stage}_time_seconds_count") == 10, stage
    inference = value(sched, "radixserve:request_inference_time_seconds_sum")
    parts = value(sched, "radixserve:request_prefill_time_seconds_sum") + value(
        sched, "radixserve:request_decode_time_seconds_sum"
    )
    assert abs(inference - parts) < 1e-3  # prefill then decode: the whole inference
    assert value(sched, "radixserve:iteration_tokens_total_count") == c.steps
    assert value(sched, "radixserve:iteration_tokens_total_sum") == c.computed_tokens


def test_retractions_are_counted_as_preemptions() -> None:
    specs = random_specs(random.Random(9), 300, max_prompt=80, max_tokens=40)
    specs = [Spec(**{**s.__dict__, "delay": s.delay * 20}) for s in specs]

    async def main() -> Scheduler:
        fake = FakeExecutor(600, 32, delay=0.0005)
        async with running_scheduler(fake, chunked_prefill_size=64) as sched:
            await run_all(sched, specs, timeout=120)
            await wait_idle(sched)
        return sched

    sched = asyncio.run(main())
    retractions = sched.load().counters.retractions
    assert retractions > 0
    assert value(sched, "radixserve:num_preemptions_total") == retractions
    ended = value(sched, "radixserve:request_inference_time_seconds_count")
    assert 0 < ended <= sched.load().counters.finished  # aborted before admission: not observed


def test_nothing_is_exported_before_an_executor_is_connected() -> None:
    registry = CollectorRegistry()
    Scheduler(SchedulerConfig(), FakeExecutor(64, 4), registry=registry)
    names = {m.name for m in registry.collect()}
    assert "radixserve:num_requests_waiting" not in names
    assert registry.get_sample_value("radixserve:request_queue_time_seconds_count", MODEL) is None
