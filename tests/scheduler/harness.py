"""An in-process executor (a real Engine behind the Step protobufs) and a scheduler over it.

The scheduler talks to `LocalExecutor` exactly as to the gRPC client: Steps go out as protobufs,
results come back as protobufs, one at a time and in order, computed on a worker thread so the
overlap loop really overlaps. Every Step is recorded for the tests to inspect.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from radixserve.v1 import executor_pb2 as pb
from services.executor.engine import Engine
from services.executor.step import error_to_pb, output_to_pb, step_from_pb
from services.executor.validation import StepRejected
from services.scheduler.config import SchedulerConfig
from services.scheduler.executor_client import ExecutorInfo
from services.scheduler.request import GenerateParams, SamplingOptions, StopOptions
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Chunk, Complete, Failure, OutputStream

EOS = 255


class LocalExecutor:
    """ExecutorLink over an in-process Engine; `steps` records every Step sent."""

    def __init__(self, engine: Engine, eos: int = EOS) -> None:
        self.engine, self.eos = engine, eos
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-executor")
        self.steps: list[pb.Step] = []
        self.on_step: Callable[[pb.Step], None] | None = None

    async def connect(self, timeout: float) -> ExecutorInfo:
        self.engine.reset()
        lim = self.engine.limits
        return ExecutorInfo(
            model_name="tiny",
            model_path="memory",
            architecture="LlamaForCausalLM",
            vocab_size=self.engine.cfg.vocab_size,
            context_length=lim.context_length,
            num_kv_slots=lim.num_slots,
            max_running_requests=lim.max_rows,
            eos_token_ids=frozenset({self.eos}),
            max_top_logprobs=lim.max_top_logprobs,
        )

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]:
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return asyncio.get_running_loop().run_in_executor(self.worker, self._run, step.SerializeToString())

    def _run(self, data: bytes) -> pb.StepResult:
        msg = pb.Step.FromString(data)
        try:
            return output_to_pb(self.engine.run_step(step_from_pb(msg)))
        except StepRejected as exc:
            return error_to_pb(msg.step_id, 3, str(exc))

    async def close(self) -> None:
        pass


def params(rid: str, prompt: list[int], max_tokens: int, n: int = 1, **kw: object) -> GenerateParams:
    sampling_kw = {k: v for k, v in kw.items() if k in SamplingOptions.__dataclass_fields__}
    stop_kw = {k: v for k, v in kw.items() if k in StopOptions.__dataclass_fields__}
    sampling_kw.setdefault("temperature", 0.0)
    return GenerateParams(
        rid, list(prompt), SamplingOptions(**sampling_kw), StopOptions(max_tokens=max_tokens, **stop_kw), n
    )


@dataclass
class Result:
    """Everything one sample streamed."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    chunks: int = 0
    complete: Complete | None = None
    cached_tokens: int = 0


async def collect(stream: OutputStream) -> dict[int, Result] | Failure:
    results: dict[int, Result] = {}
    async for event in stream.events():
        if isinstance(event, Failure):
            return event
        res = results.setdefault(event.index, Result())
        if isinstance(event, Chunk):
            res.tokens += event.token_ids
            res.logprobs += event.logprobs
            res.chunks += 1
            res.cached_tokens = event.cached_tokens
        else:
            res.complete = event
    return results


@contextlib.asynccontextmanager
async def running_scheduler(engine: Engine, **cfg: object) -> AsyncIterator[tuple[Scheduler, LocalExecutor]]:
    """A Scheduler over `engine`, its loop running; integrity is checked after every step."""
    cfg.setdefault("debug_checks", True)
    link = LocalExecutor(engine)
    sched = Scheduler(SchedulerConfig(**cfg), link)  # type: ignore[arg-type]
    task = asyncio.create_task(sched.run())
    try:
        while not sched.ready:
            await asyncio.sleep(0.001)
            if task.done():
                task.result()
        yield sched, link
        await wait_idle(sched)
        assert not task.done(), task.exception() if task.done() else None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        link.worker.shutdown(wait=True)


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
