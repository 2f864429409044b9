"""A silent or lost executor and unexpected errors in the loop: requests fail, the loop goes on."""

from __future__ import annotations

import asyncio
import time

import pytest

from radixserve.v1 import executor_pb2 as pb
from services.scheduler import scheduler as scheduler_mod
from services.scheduler import server as server_mod
from services.scheduler.config import SchedulerConfig
from services.scheduler.executor_client import ExecutorInfo
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Failure
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.harness import collect, params, running_scheduler, wait_idle

UNAVAILABLE, INTERNAL = 14, 13
PROMPTS = [[1] * 10, [2] * 10, [3] * 10]


class WedgedExecutor(FakeExecutor):
    """From step `wedge_at_step` on, steps are taken and never answered, until a reconnect."""

    def __init__(self, *args: object, wedge_at_step: int, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.wedge_at_step = wedge_at_step
        self.wedged = False
        self.closes = 0

    async def connect(self, timeout: float) -> ExecutorInfo:
        self.wedged = False
        return await super().connect(timeout)

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]:
        if self.wedged or len(self.steps) + 1 == self.wedge_at_step:
            self.wedged = True
            self.steps.append(step)
            return asyncio.get_running_loop().create_future()
        return super().send(step)

    async def close(self) -> None:
        self.closes += 1


def submit_all(sched: Scheduler, prompts: list[list[int]], max_tokens: int) -> list:
    return [
        sched.submit(params(f"r{i}", p, max_tokens, ignore_eos=True)) for i, p in enumerate(prompts)
    ]


def record_readiness(sched: Scheduler) -> list[bool]:
    seen: list[bool] = []

    async def on_serving(ready: bool) -> None:
        seen.append(ready)

    sched.on_serving = on_serving
    return seen


async def until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_unanswered_step_fails_running_and_queued_requests_within_the_deadline() -> None:
    async def main() -> None:
        fake = WedgedExecutor(4096, 16, wedge_at_step=6)
        async with running_scheduler(fake, max_running_requests=2, step_timeout_s=0.3) as sched:
            readiness = record_readiness(sched)
            started = time.monotonic()
            results = [await collect(s) for s in submit_all(sched, PROMPTS, 30)]
            elapsed = time.monotonic() - started
            for r in results:
                assert isinstance(r, Failure) and r.code == UNAVAILABLE
            first_unanswered = fake.steps[5].step_id
            assert f"did not answer step {first_unanswered} within 0.3 s" in results[0].message
            assert elapsed < 0.3 + 2.0
            await until(lambda: fake.connects == 2 and sched.ready)
            assert readiness == [False, True]
            assert fake.closes >= 1
            assert sched.load().kv.used == 0
            after = await collect(sched.submit(params("after", [4] * 10, 20, ignore_eos=True)))
            assert after[0].tokens == reference([4] * 10, 20)[0]

    asyncio.run(main())


def test_not_ready_while_the_executor_is_silent() -> None:
    async def main() -> None:
        fake = WedgedExecutor(4096, 16, wedge_at_step=3)
        connect = fake.connect
        reconnect = asyncio.Event()

        async def slow_connect(timeout: float) -> ExecutorInfo:
            if fake.connects:
                await reconnect.wait()
            return await connect(timeout)

        fake.connect = slow_connect  # type: ignore[method-assign]
        async with running_scheduler(fake, step_timeout_s=0.2) as sched:
            stream = sched.submit(params("a", [1] * 10, 30, ignore_eos=True))
            assert isinstance(await collect(stream), Failure)
            assert not sched.ready
            with pytest.raises(Exception, match="not connected"):
                sched.submit(params("b", [1] * 10, 5))
            reconnect.set()
            await until(lambda: sched.ready)

    asyncio.run(main())


def test_lost_stream_fails_the_queue_at_once() -> None:
    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        fake.lose_at_step = 6
        async with running_scheduler(fake, max_running_requests=2) as sched:
            results = [await collect(s) for s in submit_all(sched, PROMPTS, 30)]
            await wait_idle(sched)
        assert [r.code for r in results] == [UNAVAILABLE] * 3
        assert fake.connects == 2

    asyncio.run(main())


def test_idle_time_and_many_slow_steps_do_not_trip_the_deadline() -> None:
    """Each step answers within the deadline; the stream as a whole and idle gaps take longer."""

    async def main() -> None:
        fake = FakeExecutor(4096, 16, delay=0.05)
        async with running_scheduler(fake, step_timeout_s=0.25) as sched:
            for rid in ("a", "b"):
                result = await collect(sched.submit(params(rid, [5] * 8, 12, ignore_eos=True)))
                assert result[0].tokens == reference([5] * 8, 12)[0]
                await asyncio.sleep(0.4)  # idle, nothing in flight
        assert fake.connects == 1

    asyncio.run(main())


@pytest.mark.parametrize("where", ["_build_step", "_process"])
def test_unexpected_error_fails_running_requests_and_the_loop_goes_on(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the loop fails what runs with INTERNAL naming it; the queue is kept (the executor
    is still up) and runs after the reconnect, as do new requests."""
    monkeypatch.setattr(scheduler_mod, "RECONNECT_DELAY_S", 0.01)
    original = getattr(Scheduler, where)
    calls = [0]

    def failing(self: Scheduler, *args: object) -> object:
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("injected")
        return original(self, *args)

    monkeypatch.setattr(Scheduler, where, failing)

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        async with running_scheduler(fake, max_running_requests=2) as sched:
            readiness = record_readiness(sched)
            results = [await collect(s) for s in submit_all(sched, PROMPTS, 30)]
            for r in results[:2]:
                assert isinstance(r, Failure) and r.code == INTERNAL
                assert "RuntimeError: injected" in r.message
            assert results[2][0].tokens == reference(PROMPTS[2], 30)[0]
            assert readiness == [False, True]
            after = await collect(sched.submit(params("after", [4] * 10, 20, ignore_eos=True)))
            assert after[0].tokens == reference([4] * 10, 20)[0]
        assert fake.connects == 2

    asyncio.run(main())


def test_a_failing_connect_is_retried_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_mod, "RECONNECT_DELAY_S", 0.01)

    async def main() -> None:
        fake = FakeExecutor(4096, 16)
        connect = fake.connect

        async def flaky(timeout: float) -> ExecutorInfo:
            if fake.connects == 0:
                fake.connects += 1
                raise OSError("boom")
            return await connect(timeout)

        fake.connect = flaky  # type: ignore[method-assign]
        async with running_scheduler(fake) as sched:
            result = await collect(sched.submit(params("a", [1] * 8, 5, ignore_eos=True)))
            assert result[0].tokens == reference([1] * 8, 5)[0]

    asyncio.run(main())


def test_a_dead_loop_ends_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(server_mod.os, "_exit", exits.append)

    async def main() -> None:
        async def dies() -> None:
            raise RuntimeError("the loop is gone")

        async def forever() -> None:
            await asyncio.sleep(3600)

        for coro, expected in ((dies(), [server_mod.LOOP_DIED_EXIT_CODE]), (forever(), [])):
            exits.clear()
            task = asyncio.create_task(coro)
            task.add_done_callback(server_mod._exit_unless_cancelled)
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)
            assert exits == expected

    asyncio.run(main())


def test_step_timeout_must_not_be_negative() -> None:
    assert SchedulerConfig(step_timeout_s=0).step_timeout_s == 0
    with pytest.raises(ValueError, match="step-timeout-s"):
        SchedulerConfig(step_timeout_s=-1)
