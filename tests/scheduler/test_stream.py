"""The multiplexed Stream RPC on a real in-process gRPC server: one message per step, not per
token per request; admission failures as per-request events; a caller that leaves aborts."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc

from radixserve.v1 import scheduler_pb2 as pb
from radixserve.v1 import scheduler_pb2_grpc as pb_grpc
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.grpc_server import scheduler_server
from tests.scheduler.harness import wait_idle


def generate(rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> pb.StreamRequest:
    sampling = pb.SamplingOptions(
        temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=max_tokens, n=n,
        ignore_eos=True,
    )  # fmt: skip
    request = pb.GenerateRequest(request_id=rid, input_ids=prompt, sampling=sampling)
    return pb.StreamRequest(generate=request)


async def requests_of(queue: asyncio.Queue):
    while (msg := await queue.get()) is not None:
        yield msg


def test_many_requests_share_one_message_per_step() -> None:
    """16 requests × 24 tokens arrive in about one message per step (not 384 messages)."""
    num, tokens = 16, 24
    prompts = {f"r{i}": [i + 1] * (3 + i) for i in range(num)}

    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 32, delay=0.002)) as (sched, _, addr):
            async with grpc.aio.insecure_channel(addr) as channel:
                outbox: asyncio.Queue = asyncio.Queue()
                for rid, prompt in prompts.items():
                    outbox.put_nowait(generate(rid, prompt, tokens))
                call = pb_grpc.SchedulerStub(channel).Stream(requests_of(outbox))
                got: dict[str, list[int]] = defaultdict(list)
                done, batches, multi = set(), 0, 0
                while len(done) < num:
                    batch = await asyncio.wait_for(call.read(), 10)
                    batches += 1
                    multi += len({e.request_id for e in batch.events}) > 1
                    for e in batch.events:
                        assert e.WhichOneof("event") != "error", e.error
                        if e.HasField("chunk"):
                            got[e.request_id] += e.chunk.token_ids
                        else:
                            done.add(e.request_id)
                outbox.put_nowait(None)
                assert await call.read() == grpc.aio.EOF  # half-closed and nothing in flight
                steps = sched.counters.steps
            await wait_idle(sched)
        for rid, prompt in prompts.items():
            assert got[rid] == reference(prompt, tokens)[0]
        assert batches <= steps + 1, (batches, steps)
        assert batches < num * tokens / 8 and multi >= tokens / 2

    asyncio.run(main())


def test_admission_failures_are_events_of_their_request() -> None:
    async def main() -> None:
        link = FakeExecutor(4096, 2, context_length=256, delay=0.002)
        async with scheduler_server(link, max_queued_requests=2) as (sched, _, addr):
            async with grpc.aio.insecure_channel(addr) as channel:
                outbox: asyncio.Queue = asyncio.Queue()
                call = pb_grpc.SchedulerStub(channel).Stream(requests_of(outbox))
                for i in range(4):  # two run, then two wait
                    outbox.put_nowait(generate(f"ok{i}", [i + 1] * 5, 150))
                    want = (min(i + 1, 2), max(i - 1, 0))
                    while (len(sched.running), len(sched.waiting)) != want:
                        await asyncio.sleep(0.001)
                outbox.put_nowait(generate("full", [1, 2], 4))
                outbox.put_nowait(generate("long", [1] * 200, 100))
                outbox.put_nowait(generate("ok0", [1], 1))
                outbox.put_nowait(pb.StreamRequest(generate=pb.GenerateRequest(request_id="bare")))
                errors, completes = {}, set()
                while len(completes) < 4:
                    for e in (await asyncio.wait_for(call.read(), 10)).events:
                        if e.HasField("error"):
                            errors[e.request_id] = e.error
                        elif e.HasField("complete"):
                            completes.add(e.request_id)
                call.cancel()
            await wait_idle(sched)
        codes = {rid: e.code for rid, e in errors.items()}
        assert codes == {
            "full": grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            "long": grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "ok0": grpc.StatusCode.ALREADY_EXISTS.value[0],
            "bare": grpc.StatusCode.INVALID_ARGUMENT.value[0],
        }
        assert "256" in errors["long"].message and "200" in errors["long"].message
        assert completes == {"ok0", "ok1", "ok2", "ok3"}

    asyncio.run(main())


def test_caller_that_goes_away_aborts_its_requests() -> None:
    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 8, delay=0.002)) as (sched, _, addr):
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = pb_grpc.SchedulerStub(channel)
                outbox: asyncio.Queue = asyncio.Queue()
                call = stub.Stream(requests_of(outbox))
                outbox.put_nowait(generate("a", [1] * 10, 2000))
                outbox.put_nowait(generate("b", [2] * 10, 2000))
                await asyncio.wait_for(call.read(), 10)
                outbox.put_nowait(pb.StreamRequest(abort=pb.AbortRequest(request_id="a")))
                while "a" not in {
                    e.request_id for e in (await call.read()).events if e.HasField("complete")
                }:
                    pass
                assert [r.rid for r in sched.running] == ["b"]
                call.cancel()
                deadline = asyncio.get_running_loop().time() + 2
                while sched.running or sched.waiting:
                    assert asyncio.get_running_loop().time() < deadline, "b still running"
                    await asyncio.sleep(0.005)
                assert sched.cache.stats().used == 0
            await wait_idle(sched)

    asyncio.run(main())
