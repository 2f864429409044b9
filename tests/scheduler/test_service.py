"""The scheduler and executor as real processes, talking gRPC, on the tiny random-weight model."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radixserve.v1 import scheduler_pb2 as pb
from radixserve.v1 import scheduler_pb2_grpc as pb_grpc
from tests.executor.driver import Driver, first_divergence, top2_gap
from tests.executor.tiny import engine_for, hf_model
from tests.procs import ServiceProcess, free_port

pytestmark = pytest.mark.slow
EOS = 255
NEAR_TIE = 1e-3  # logit gap under which batched float32 may legitimately pick the other token


def executor_args(model_dir: Path, port: int) -> list[str]:
    return [
        "executor", "--model-path", str(model_dir), "--port", str(port), "--dtype", "float32",
        "--max-total-tokens", "6000", "--max-running-requests", "64", "--context-length", "512",
        "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def executor_port(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "executor.log"
    with ServiceProcess(executor_args(tiny_model_dir, port), log) as proc:
        proc.wait_grpc_serving(port)
        yield port


def start_scheduler(executor_port: int, log: Path, *flags: str) -> tuple[ServiceProcess, int]:
    port = free_port()
    args = [
        "scheduler",
        "--executor",
        f"127.0.0.1:{executor_port}",
        "--port",
        str(port),
        "--debug-checks",
        *flags,
    ]
    return ServiceProcess(args, log), port


@pytest.fixture(scope="module")
def model():
    hf = hf_model("llama")
    return hf, Driver(engine_for(hf, num_slots=2048, max_rows=2))


def sampling(max_tokens: int, **kw: object) -> pb.SamplingOptions:
    return pb.SamplingOptions(
        temperature=0.0, top_p=1.0, repetition_penalty=1.0, max_tokens=max_tokens, n=1, **kw
    )


async def generate(
    stub: pb_grpc.SchedulerStub, rid: str, prompt: list[int], opts: pb.SamplingOptions
):
    tokens, complete = [], None
    async for msg in stub.Generate(
        pb.GenerateRequest(request_id=rid, input_ids=prompt, sampling=opts)
    ):
        if msg.HasField("chunk"):
            tokens += msg.chunk.token_ids
        elif msg.HasField("complete"):
            complete = msg.complete
        else:
            raise AssertionError(f"{rid}: {msg.error}")
    return tokens, complete


async def wait_load(stub: pb_grpc.SchedulerStub, ok, timeout: float = 10.0) -> pb.GetLoadResponse:
    deadline = time.monotonic() + timeout
    while not ok(load := await stub.GetLoad(pb.GetLoadRequest())):
        assert time.monotonic() < deadline, f"load never reached the expected state: {load}"
        await asyncio.sleep(0.002)
    return load


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=5)
            .status
        )


def wait_health(port: int, want: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if health(port) == want:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"health never became {want}"
        time.sleep(0.1)


def test_serving_follows_the_executor(tiny_model_dir: Path, tmp_path: Path) -> None:
    """NOT_SERVING (and UNAVAILABLE) until the executor is up; NOT_SERVING again when it goes."""
    executor = free_port()
    proc, port = start_scheduler(executor, tmp_path / "scheduler.log")
    with proc:
        wait_health(port, health_pb2.HealthCheckResponse.NOT_SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetLoad(pb.GetLoadRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with ServiceProcess(executor_args(tiny_model_dir, executor), tmp_path / "executor.log"):
            wait_health(port, health_pb2.HealthCheckResponse.SERVING)
            tokens, complete = asyncio.run(one_request(port))
            assert len(tokens) == 3 and complete.reason == pb.FINISH_REASON_LENGTH
        wait_health(port, health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)


async def one_request(port: int):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SchedulerStub(channel)
        return await generate(stub, "one", [1, 2, 3], sampling(3, ignore_eos=True))


def test_batched_greedy_matches_alone(executor_port: int, model, tmp_path: Path) -> None:
    """64 concurrent requests of random lengths produce what each produces alone."""
    hf, driver = model
    rng = random.Random(0)
    prompts = [[rng.randrange(250) for _ in range(rng.randint(1, 120))] for _ in range(64)]
    lengths = [rng.randint(1, 48) for _ in prompts]

    async def main(port: int) -> tuple[list, pb.GetLoadResponse, pb.GetModelInfoResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        generate(stub, f"b{i}", p, sampling(n))
                        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
                    )
                ),
                120,
            )
            await stub.FlushCache(pb.FlushCacheRequest())
            return results, await stub.GetLoad(pb.GetLoadRequest()), info

    proc, port = start_scheduler(executor_port, tmp_path / "scheduler.log")
    with proc:
        proc.wait_grpc_serving(port)
        results, load, info = asyncio.run(main(port))
    assert (info.vocab_size, info.context_length, list(info.eos_token_ids)) == (256, 512, [EOS])
    assert (info.num_kv_slots, info.max_running_requests) == (6000, 64)
    assert (info.device, info.chunked_prefill_size) == ("cpu", 512)  # the CPU's default
    near_ties = 0
    for prompt, n, (tokens, complete) in zip(prompts, lengths, results, strict=True):
        driver.next_slot = 1
        alone = driver.generate([prompt], n)[0].output
        if EOS in alone:
            alone = alone[: alone.index(EOS)]
        k = first_divergence(tokens, alone)
        if k is not None and k < min(len(tokens), len(alone)):
            assert top2_gap(hf, prompt + alone[:k]) < NEAR_TIE, (
                f"diverged at {k} without a near-tie"
            )
            near_ties += 1
            continue
        assert tokens == alone
        assert complete.reason == (
            pb.FINISH_REASON_STOP if len(alone) < n else pb.FINISH_REASON_LENGTH
        )
    assert near_ties <= 2
    assert load.num_running == load.num_waiting == 0
    assert load.kv_slots_free == load.kv_slots_total == 6000
    assert load.requests_finished_total == 64 and load.integrity_checks_total >= load.steps_total


def test_abort_and_client_cancel_free_slots(executor_port: int, tmp_path: Path) -> None:
    async def main(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            call = stub.Generate(
                pb.GenerateRequest(
                    request_id="long", input_ids=[5] * 50, sampling=sampling(400, ignore_eos=True)
                )
            )
            first = await call.read()
            assert first.HasField("chunk")
            assert (await stub.GetLoad(pb.GetLoadRequest())).kv_slots_used > 50
            assert (await stub.Abort(pb.AbortRequest(request_id="long"))).found
            load = await stub.GetLoad(pb.GetLoadRequest())
            assert (load.kv_slots_used, load.num_running) == (0, 0)
            rest = [first]
            while (msg := await call.read()) != grpc.aio.EOF:
                rest.append(msg)
            assert rest[-1].complete.reason == pb.FINISH_REASON_ABORT
            assert not (await stub.Abort(pb.AbortRequest(request_id="unknown"))).found

            call = stub.Generate(
                pb.GenerateRequest(
                    request_id="gone", input_ids=[6] * 50, sampling=sampling(400, ignore_eos=True)
                )
            )
            await call.read()
            call.cancel()
            load = await wait_load(stub, lambda x: x.num_running == 0)
            assert load.kv_slots_used == 0

    proc, port = start_scheduler(executor_port, tmp_path / "scheduler.log")
    with proc:
        proc.wait_grpc_serving(port)
        asyncio.run(main(port))


def test_queue_and_context_limits(executor_port: int, model, tmp_path: Path) -> None:
    """Over the queue limit: RESOURCE_EXHAUSTED at once; past the context: INVALID_ARGUMENT naming
    both numbers; the running requests finish untouched."""
    _, driver = model
    prompts = [[i + 1] * 20 for i in range(4)]

    async def main(port: int) -> tuple[list, pb.GetLoadResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)
            tasks = []
            for i, p in enumerate(prompts):  # two run, then two wait
                tasks.append(
                    asyncio.create_task(generate(stub, f"q{i}", p, sampling(60, ignore_eos=True)))
                )
                want = (min(i + 1, 2), max(i - 1, 0))
                await wait_load(stub, lambda x, want=want: (x.num_running, x.num_waiting) == want)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await generate(stub, "over", [1, 2, 3], sampling(5))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.aio.AioRpcError) as long:
                await generate(stub, "long", [1] * 200, sampling(100))
            assert long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (
                "200" in long.value.details()
                and "100" in long.value.details()
                and "256" in long.value.details()
            )
            with pytest.raises(grpc.aio.AioRpcError) as dup:
                await generate(stub, "q0", [1], sampling(1))
            assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return results, await stub.GetLoad(pb.GetLoadRequest())

    flags = ("--max-queued-requests", "2", "--max-running-requests", "2", "--context-length", "256")
    proc, port = start_scheduler(executor_port, tmp_path / "scheduler.log", *flags)
    with proc:
        proc.wait_grpc_serving(port)
        results, load = asyncio.run(main(port))
    for prompt, (tokens, complete) in zip(prompts, results, strict=True):
        driver.next_slot = 1
        assert tokens == driver.generate([prompt], 60)[0].output
        assert complete.reason == pb.FINISH_REASON_LENGTH
    assert load.request_rejections_total == 1
