"""The gateway's multiplexed scheduler stream against a real in-process scheduler server:
demultiplexing, per-request errors, a scheduler that goes away, and the request timeout."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.clients import SchedulerClient
from services.gateway.errors import GatewayError, InvalidRequest, Overloaded, Timeout, Unavailable
from services.gateway.events import SampleEnd, TokenChunk
from services.gateway.sampling import GenerationInput, SamplingParams, TextOptions
from services.gateway.scheduler_stream import RequestEvents
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.grpc_server import scheduler_server


def inp(rid: str, prompt: list[int], max_tokens: int, n: int = 1) -> GenerationInput:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=n, ignore_eos=True)
    return GenerationInput(rid, prompt, sampling, TextOptions())


async def drain(events: RequestEvents) -> dict[int, list[int]]:
    """Tokens per sample, checking each sample ends exactly once, after its tokens (alone, or
    riding on the chunk of its last tokens)."""
    tokens: dict[int, list[int]] = {}
    ended: set[int] = set()
    while (event := await events.next()) is not None:
        assert event.index not in ended
        if isinstance(event, TokenChunk):
            tokens.setdefault(event.index, []).extend(event.token_ids)
            if event.end is not None:
                ended.add(event.index)
        else:
            assert isinstance(event, SampleEnd)
            ended.add(event.index)
    return tokens


def test_interleaved_requests_each_get_their_own_tokens() -> None:
    prompts = {f"r{i}": [(7 * i) % 250 + 1] * (2 + i % 5) for i in range(12)}

    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 32, delay=0.001)) as (_, _, addr):
            client = SchedulerClient(addr)
            streams = {
                rid: client.generate(inp(rid, p, 10 + i, n=1 + i % 2), 30.0)
                for i, (rid, p) in enumerate(prompts.items())
            }
            results = await asyncio.gather(*(drain(s) for s in streams.values()))
            await client.close()
        for i, ((rid, prompt), got) in enumerate(zip(prompts.items(), results, strict=True)):
            want = reference(prompt, 10 + i)[0]
            assert got == dict.fromkeys(range(1 + i % 2), want), rid

    asyncio.run(main())


def test_an_error_for_one_request_leaves_the_others_alone() -> None:
    async def main() -> None:
        link = FakeExecutor(4096, 2, context_length=256, delay=0.002)
        async with scheduler_server(link, max_queued_requests=2) as (sched, _, addr):
            client = SchedulerClient(addr)
            ok = [client.generate(inp(f"ok{i}", [i + 1] * 4, 60), 30.0) for i in range(2)]
            while len(sched.running) < 2:
                await asyncio.sleep(0.001)
            bad = {
                "full": client.generate(inp("full", [1], 4, n=3), 30.0),
                "long": client.generate(inp("long", [1] * 200, 100), 30.0),
            }
            with pytest.raises(InvalidRequest, match="already in flight"):
                client.generate(inp("ok0", [1], 1), 30.0)
            with pytest.raises(Overloaded):
                await bad["full"].next()
            with pytest.raises(InvalidRequest, match="256"):
                await bad["long"].next()
            results = await asyncio.gather(*(drain(s) for s in ok))
            await client.close()
        assert [r[0] for r in results] == [reference([i + 1] * 4, 60)[0] for i in range(2)]

    asyncio.run(main())


def test_a_scheduler_that_goes_away_fails_every_request_at_once() -> None:
    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 8, delay=0.002)) as (_, server, addr):
            client = SchedulerClient(addr)
            streams = [client.generate(inp(f"r{i}", [i + 1] * 3, 3000), 30.0) for i in range(4)]
            for s in streams:
                assert isinstance(await s.next(), TokenChunk)
            await server.stop(0)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for s in streams:
                with pytest.raises(Unavailable, match="scheduler is unavailable"):
                    while await s.next() is not None:
                        pass
            assert loop.time() - start < 1.0
            with pytest.raises(GatewayError):  # a new call: still nothing behind the address
                await client.generate(inp("later", [1], 2), 30.0).next()
            await client.close()

    asyncio.run(main())


def test_the_request_timeout_ends_one_request() -> None:
    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 8, delay=0.002)) as (sched, _, addr):
            client = SchedulerClient(addr)
            slow = client.generate(inp("slow", [1, 2], 3000), 0.2)
            quick = client.generate(inp("quick", [3, 4], 5), 30.0)
            with pytest.raises(Timeout):
                while await slow.next() is not None:
                    pass
            client.abort_soon("slow")
            assert (await drain(quick))[0] == reference([3, 4], 5)[0]
            while sched.running:
                await asyncio.sleep(0.005)
            await client.close()

    asyncio.run(main())


def test_a_slow_reader_gets_coalesced_chunks() -> None:
    async def main() -> None:
        async with scheduler_server(FakeExecutor(4096, 8, delay=0.001)) as (_, _, addr):
            client = SchedulerClient(addr)
            events = client.generate(inp("slow", [5, 6], 60, n=2), 30.0)
            chunks: dict[int, list[TokenChunk]] = {0: [], 1: []}
            while (event := await events.next()) is not None:
                if isinstance(event, TokenChunk):
                    chunks[event.index].append(event)
                await asyncio.sleep(0.03)  # a slow client
            await client.close()
        want = reference([5, 6], 60)[0]
        for got in chunks.values():
            assert [t for c in got for t in c.token_ids] == want
            assert 1 < len(got) < 20 and got[-1].completion_tokens == 60

    asyncio.run(main())


def test_a_length_finish_rides_on_the_chunk_of_the_last_token() -> None:
    """The scheduler ends a sample in the step that made its last token: the gateway gets the
    end with those tokens, never as an event of its own."""

    async def main() -> list[TokenChunk | SampleEnd]:
        async with scheduler_server(FakeExecutor(4096, 8, delay=0.001)) as (_, _, addr):
            client = SchedulerClient(addr)
            events = client.generate(inp("last", [5, 6], 6, n=2), 30.0)
            got = []
            while (event := await events.next()) is not None:
                got.append(event)
            await client.close()
        return got

    got = asyncio.run(main())
    assert all(isinstance(e, TokenChunk) for e in got)
    for index in (0, 1):
        mine = [e for e in got if e.index == index]
        assert [t for c in mine for t in c.token_ids] == reference([5, 6], 6)[0]
        assert [c.end is not None for c in mine] == [False] * (len(mine) - 1) + [True]
        end = mine[-1].end
        assert end is not None and (end.reason, end.completion_tokens) == ("length", 6)
