"""Output streams: order, coalescing for slow readers, failure, and no waiting on the producer."""

from __future__ import annotations

import asyncio

from services.scheduler.request import FinishReason
from services.scheduler.streams import Chunk, Complete, Failure, OutputStream, Token


def done(index: int, n: int) -> Complete:
    return Complete(index, FinishReason.LENGTH, None, 3, n, 0)


def test_slow_reader_gets_coalesced_chunks() -> None:
    async def main() -> None:
        stream = OutputStream(1, prompt_tokens=3, logprobs=True)
        events: list = []

        async def slow_reader() -> None:
            async for event in stream.events():
                events.append(event)
                await asyncio.sleep(0.05)  # a slow client

        reader = asyncio.create_task(slow_reader())
        for i in range(20):  # the producer never waits: 20 "steps" in ~20 ms
            stream.push(0, Token(i, -0.5), i + 1, 2)
            await asyncio.sleep(0.001)
        stream.complete(done(0, 20))
        await asyncio.wait_for(reader, 5)
        chunks = [e for e in events if isinstance(e, Chunk)]
        assert 1 < len(chunks) < 10
        assert [t for c in chunks for t in c.token_ids] == list(range(20))
        assert [x for c in chunks for x in c.logprobs] == [-0.5] * 20
        assert chunks[-1].completion_tokens == 20 and chunks[-1].cached_tokens == 2
        assert events[-1] == done(0, 20)

    asyncio.run(main())


def test_samples_interleave_and_each_completes_after_its_tokens() -> None:
    async def main() -> None:
        stream = OutputStream(2, prompt_tokens=3, logprobs=False)
        stream.push(0, Token(5, top_ids=[5, 6], top_logprobs=[-0.1, -2.0]), 1, 0)
        stream.push(1, Token(7), 1, 2)
        stream.complete(done(1, 1))
        stream.push(0, Token(8), 2, 0)
        stream.complete(done(0, 2))
        assert stream.done
        events = [e async for e in stream.events()]
        assert [type(e).__name__ for e in events] == ["Chunk", "Chunk", "Complete", "Complete"]
        assert (
            events[0].token_ids == [5, 8]
            and events[0].top_ids == [5, 6]
            and events[0].logprobs == []
        )
        assert events[1].index == 1 and events[1].token_ids == [7]

    asyncio.run(main())


def test_failure_ends_the_stream() -> None:
    async def main() -> None:
        stream = OutputStream(2, 3, False)
        stream.push(0, Token(1), 1, 0)
        stream.fail(14, "executor lost")
        stream.fail(13, "ignored: already ended")
        events = [e async for e in stream.events()]
        assert events[-1] == Failure(14, "executor lost") and len(events) == 2

    asyncio.run(main())
