"""Admission limits, hold-back, retraction order and the new-token ratio, on the checking fake."""

from __future__ import annotations

import asyncio

import pytest

from radixserve.v1 import executor_pb2 as pb
from services.scheduler.prefill import NewTokenRatio
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.harness import collect, params, running_scheduler, wait_idle


def prefill_lengths(step: pb.Step) -> list[int]:
    return [len(s.input_ids) for s in step.slices if not s.use_last_sampled]


def submit_all(sched, prompts: list[list[int]], max_tokens: int) -> list:
    return [
        sched.submit(params(f"r{i}", p, max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)
    ]


async def finish(streams: list, prompts: list[list[int]], max_tokens: int) -> None:
    for stream, prompt in zip(streams, prompts, strict=True):
        result = await collect(stream)
        assert result[0].tokens == reference(prompt, max_tokens)[0]


def test_token_budget_chunks_the_request_that_does_not_fit() -> None:
    prompts = [[i] * 30 for i in range(5)]

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        async with running_scheduler(fake, chunked_prefill_size=100) as sched:
            await finish(submit_all(sched, prompts, 4), prompts, 4)
        assert prefill_lengths(fake.steps[0]) == [30, 30, 30, 10]
        assert sum(prefill_lengths(fake.steps[1])) == 20 + 30  # the chunk's rest, then the 5th

    asyncio.run(main())


@pytest.mark.parametrize(
    "device, flag, budget", [("cpu", None, 512), ("cuda", None, 2048), ("cpu", 100, 100)]
)
def test_the_prefill_budget_defaults_by_the_executor_s_device(
    device: str, flag: int | None, budget: int
) -> None:
    prompts = [[i + 1] * 1000 for i in range(3)]

    async def main() -> None:
        fake = FakeExecutor(8192, 16)
        fake.device = device
        cfg = {} if flag is None else {"chunked_prefill_size": flag}
        async with running_scheduler(fake, **cfg) as sched:
            assert sched.prefill.chunk_size == budget
            await finish(submit_all(sched, prompts, 2), prompts, 2)
        assert sum(prefill_lengths(fake.steps[0])) == budget

    asyncio.run(main())


@pytest.mark.parametrize(
    "device, end_decode, flag, iterations",
    [("cpu", True, None, 8), ("cuda", True, None, 1), ("cpu", False, None, 1), ("cpu", True, 2, 2)],
)
def test_continuous_decode_steps_default_by_the_executor_s_device(
    device: str, end_decode: bool, flag: int | None, iterations: int
) -> None:
    """8 decode iterations per Step on a CPU executor with EndDecode, 1 on others (and on one
    without it, where an arrival would wait out every iteration), unless the flag says."""
    prompts = [[i + 1] * 10 for i in range(3)]

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        fake.device, fake.end_decode = device, end_decode
        cfg = {} if flag is None else {"num_continuous_decode_steps": flag}
        async with running_scheduler(fake, **cfg) as sched:
            await finish(submit_all(sched, prompts, 12), prompts, 12)
        assert max(max(s.decode_steps, 1) for s in fake.steps) == iterations

    asyncio.run(main())


def test_max_running_requests_caps_the_rows_in_use() -> None:
    prompts = [[i + 1] * 5 for i in range(9)]

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        peak = 0
        async with running_scheduler(fake, max_running_requests=3) as sched:
            streams = submit_all(sched, prompts, 6)
            while sched.waiting or sched.running:
                peak = max(peak, len(fake.rows))
                await asyncio.sleep(0)
            await finish(streams, prompts, 6)
        assert peak == 3

    asyncio.run(main())


def test_memory_reservation_limits_admission() -> None:
    """Each request reserves 10 + 0.7 × 100 = 80 slots: 300 slots admit 3 at first, not 4."""
    prompts = [[i + 1] * 10 for i in range(4)]

    async def main() -> None:
        fake = FakeExecutor(300, 16)
        async with running_scheduler(fake) as sched:
            streams = submit_all(sched, prompts, 100)
            await asyncio.sleep(0)
            await finish(streams, prompts, 100)
        assert len(fake.steps[0].add) == 3

    asyncio.run(main())


def test_identical_prompts_wait_for_the_first_to_cache_it() -> None:
    prompt = list(range(1, 101))

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        async with running_scheduler(fake) as sched:
            streams = submit_all(sched, [prompt] * 3, 5)
            await finish(streams, [prompt] * 3, 5)
        assert prefill_lengths(fake.steps[0]) == [100]
        assert prefill_lengths(fake.steps[1]) == [1, 1]

    asyncio.run(main())


def test_retraction_picks_the_fewest_generated_tokens_first() -> None:
    """The late arrival has generated least, so it is the one retracted."""
    early = [[1] * 20, [2] * 20]
    late = [3] * 20

    async def main() -> None:
        fake = FakeExecutor(200, 16)
        retracted: list[str] = []
        async with running_scheduler(fake, schedule_conservativeness=0.2) as sched:
            streams = submit_all(sched, early, 60)
            while min((len(r.output) for r in sched.running), default=0) < 20:
                await asyncio.sleep(0)
            streams.append(sched.submit(params("late", late, 60, ignore_eos=True)))
            while sched.counters.retractions == 0:
                await asyncio.sleep(0)
            retracted = [r.rid for r in sched.waiting if r.retracted]
            await finish(streams, [*early, late], 60)
            await wait_idle(sched)
        assert retracted == ["late"]
        assert sched.counters.finished == 3

    asyncio.run(main())


def test_new_token_ratio_decays_and_resets() -> None:
    ratio = NewTokenRatio(1.0)
    assert ratio.value == 0.7
    for _ in range(10_000):
        ratio.decay()
    assert ratio.value == ratio.floor > 0
    ratio.on_retract()
    assert ratio.value == 1.0


def test_rejected_step_fails_running_requests_and_keeps_the_queue() -> None:
    """Running requests get INTERNAL; the executor is still up, so the queued one runs after the
    scheduler reconnects with a clean state."""
    prompts = [[1] * 10, [2] * 10, [3] * 10]

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        fake.reject_at_step = 6
        async with running_scheduler(fake, max_running_requests=2) as sched:
            streams = submit_all(sched, prompts, 30)
            results = [await collect(s) for s in streams]
            await wait_idle(sched)
            assert sched.load().kv.used == 0
        assert [r.code for r in results[:2]] == [13, 13]
        assert results[2][0].tokens == reference(prompts[2], 30)[0]
        assert fake.connects == 2

    asyncio.run(main())


def test_priority_policy_admits_lower_values_first_and_other_policies_refuse_it() -> None:
    import dataclasses

    import pytest

    from services.scheduler.errors import InvalidRequest

    priorities = [3, -2, 7, 0]

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        cfg = {"schedule_policy": "priority", "max_running_requests": 1}
        async with running_scheduler(fake, **cfg) as sched:
            streams = [
                sched.submit(dataclasses.replace(params(f"r{i}", [i + 1] * 5, 2), priority=p))
                for i, p in enumerate(priorities)
            ]
            for stream in streams:
                await collect(stream)
        admitted = [a.request_id for step in fake.steps for a in step.add]
        assert admitted == ["r1", "r3", "r0", "r2"]  # -2, 0, 3, 7
        async with running_scheduler(FakeExecutor(4096, 16)) as sched:  # lpm
            with pytest.raises(InvalidRequest, match="--schedule-policy priority"):
                sched.submit(dataclasses.replace(params("x", [1, 2], 2), priority=1))
            await collect(sched.submit(params("y", [1, 2], 2)))  # priority 0 is fine

    asyncio.run(main())
