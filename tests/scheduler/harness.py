"""Running a Scheduler in process over any ExecutorLink, and collecting what it streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.scheduler.config import SchedulerConfig
from services.scheduler.executor_client import ExecutorLink
from services.scheduler.request import (
    GenerateParams,
    PromptLogprobs,
    SamplingOptions,
    StopOptions,
)
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Chunk, Complete, Failure, OutputStream


def params(
    rid: str, prompt: list[int], max_tokens: int, n: int = 1, **kw: object
) -> GenerateParams:
    sampling_kw = {k: v for k, v in kw.items() if k in SamplingOptions.__dataclass_fields__}
    stop_kw = {k: v for k, v in kw.items() if k in StopOptions.__dataclass_fields__}
    sampling_kw.setdefault("temperature", 0.0)
    return GenerateParams(
        rid,
        list(prompt),
        SamplingOptions(**sampling_kw),
        StopOptions(max_tokens=max_tokens, **stop_kw),
        n,
        logprob_start_len=int(kw.get("logprob_start_len", -1)),  # type: ignore[call-overload]
    )


@dataclass
class Result:
    """Everything one sample streamed."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    chunks: int = 0
    complete: Complete | None = None
    cached_tokens: int = 0
    prompt: PromptLogprobs | None = None  # prompt logprobs, from the first chunk
    prompt_chunks: int = 0  # chunks that carried prompt logprobs (at most the first one)


async def collect(stream: OutputStream) -> dict[int, Result] | Failure:
    results: dict[int, Result] = {}
    async for event in stream.events():
        if isinstance(event, Failure):
            return event
        res = results.setdefault(event.index, Result())
        if isinstance(event, Chunk):
            if event.prompt is not None:
                assert res.chunks == 0, "prompt logprobs after the first chunk"
                res.prompt = event.prompt
                res.prompt_chunks += 1
            res.tokens += event.token_ids
            res.logprobs += event.logprobs
            res.chunks += 1
            res.cached_tokens = event.cached_tokens
        else:
            res.complete = event
    return results


@contextlib.asynccontextmanager
async def running_scheduler(link: ExecutorLink, **cfg: object) -> AsyncIterator[Scheduler]:
    """A Scheduler over `link`, its loop running; integrity is checked after every step."""
    cfg.setdefault("debug_checks", True)
    sched = Scheduler(SchedulerConfig(**cfg), link)  # type: ignore[arg-type]
    task = asyncio.create_task(sched.run())
    try:
        while not sched.ready:
            await asyncio.sleep(0.001)
            if task.done():
                task.result()
        yield sched
        await wait_idle(sched)
        assert not task.done(), task.exception() if task.done() else None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await link.close()


async def wait_idle(sched: Scheduler, timeout: float = 30.0) -> None:
    """Until nothing runs, waits, or is in flight (the loop then checks integrity)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while sched.running or sched.waiting or sched._inflight or sched._releases:
        assert asyncio.get_running_loop().time() < deadline, (
            f"not idle: {len(sched.running)} running, {len(sched.waiting)} waiting, "
            f"{len(sched._inflight)} in flight, releases {sched._releases}"
        )
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.005)


async def generate(sched: Scheduler, p: GenerateParams) -> dict[int, Result] | Failure:
    return await collect(sched.submit(p))
