"""The gateway's shared DetokenizeBatch call against a real in-process tokenizer server (toy
vocabulary): one message per event-loop tick for many samples, text exactly as a sample's own
stream gives it, and a tokenizer that goes away failing every sample at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from radixserve.v1 import tokenizer_pb2_grpc as tpb_grpc
from services.gateway.clients import TokenizerClient
from services.gateway.errors import InvalidRequest, Unavailable
from services.gateway.sampling import GenerationInput, SamplingParams, TextOptions
from services.tokenizer.servicer import TokenizerServicer
from services.tokenizer.stream import DetokenizeOptions, DetokenizeStream
from tests.gateway.fakes import char_decode, ids_of


class ToyTokenizer:
    def new_detokenizer(self, options: DetokenizeOptions) -> DetokenizeStream:
        return DetokenizeStream(char_decode, options)


class CountingServicer(TokenizerServicer):
    """Counts the DetokenizeBatch messages the server receives."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = ToyTokenizer()  # type: ignore[assignment]
        self.received = 0

    async def DetokenizeBatch(self, request_iterator, context):
        async def counted():
            async for msg in request_iterator:
                self.received += 1
                yield msg

        async for reply in super().DetokenizeBatch(counted(), context):
            yield reply


@contextlib.asynccontextmanager
async def tokenizer_server() -> AsyncIterator[tuple[CountingServicer, grpc.aio.Server, str]]:
    servicer = CountingServicer()
    server = grpc.aio.server()
    tpb_grpc.add_TokenizerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
        servicer.pool.shutdown(wait=False)


def inp(rid: str, stop: tuple[str, ...] = ()) -> GenerationInput:
    return GenerationInput(rid, [1], SamplingParams(max_tokens=64), TextOptions(stop=stop))


def test_a_tick_of_many_samples_is_one_message() -> None:
    """32 samples fed in lockstep, 12 rounds: 12 messages, not 384, and each text is its own."""
    texts = [f"sample {i}: héllo wörld 🎉 and STOP there"[: 12 + i] for i in range(32)]

    async def one(client: TokenizerClient, i: int, text: str) -> tuple[str, bool]:
        detok = await client.detokenizer(inp(f"r{i}", stop=("STOP",)), 0)
        ids, out = ids_of(text), []
        for k in range(12):
            part = ids[k * 4 : (k + 1) * 4]
            delta = await detok.feed(part, finish=k == 11)
            out.append(delta.text)
            if delta.finished:
                break
        return "".join(out), detok.finished

    async def main() -> None:
        async with tokenizer_server() as (servicer, _, addr):
            client = TokenizerClient([addr])
            results = await asyncio.gather(*(one(client, i, t) for i, t in enumerate(texts)))
            await client.close()
        for text, (got, finished) in zip(texts, results, strict=True):
            assert got == text.split("STOP")[0] and finished
        assert servicer.received <= 12, servicer.received

    asyncio.run(main())


def test_bad_setup_fails_only_its_sample() -> None:
    async def main() -> None:
        async with tokenizer_server() as (_, _, addr):
            client = TokenizerClient([addr])
            bad = await client.detokenizer(inp("bad", stop=("",)), 0)
            good = await client.detokenizer(inp("good"), 0)
            results = await asyncio.gather(
                bad.feed([65]), good.feed(ids_of("ok")), return_exceptions=True
            )
            assert isinstance(results[0], InvalidRequest) and "empty" in results[0].message
            assert results[1].text == "ok"
            assert (await good.feed([], finish=True)).finished
            await client.close()

    asyncio.run(main())


def test_a_tokenizer_that_goes_away_fails_every_sample_at_once() -> None:
    async def main() -> None:
        async with tokenizer_server() as (_, server, addr):
            client = TokenizerClient([addr])
            samples = [await client.detokenizer(inp(f"r{i}"), 0) for i in range(5)]
            await asyncio.gather(*(s.feed([65]) for s in samples))
            await server.stop(0)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for s in samples:
                with pytest.raises(Unavailable, match="tokenizer is unavailable"):
                    while True:
                        await s.feed([66])
            assert loop.time() - start < 1.0
            await client.close()

    asyncio.run(main())


def test_samples_fail_over_to_another_tokenizer_and_their_text_goes_on() -> None:
    """Two tokenizers; one goes away mid-stream: every sample's text continues on the other,
    unbroken, stop strings included."""
    texts = [f"sample {i}: héllo wörld 🎉 STOP never" for i in range(8)]

    async def one(client: TokenizerClient, i: int, text: str, stopped: asyncio.Event) -> str:
        detok = await client.detokenizer(inp(f"r{i}", stop=("STOP",)), 0)
        ids, out = ids_of(text), []
        for k in range(0, len(ids), 3):
            if k == 9:
                await stopped.wait()  # the first tokenizer is gone from here on
            delta = await detok.feed(ids[k : k + 3], finish=k + 3 >= len(ids))
            out.append(delta.text)
            if delta.finished:
                break
        assert detok.finished
        return "".join(out)

    async def main() -> None:
        async with tokenizer_server() as (_, first, a), tokenizer_server() as (_, _, b):
            client = TokenizerClient([a, b])
            stopped = asyncio.Event()
            tasks = [asyncio.create_task(one(client, i, t, stopped)) for i, t in enumerate(texts)]
            await asyncio.sleep(0.2)
            await first.stop(0)
            stopped.set()
            results = await asyncio.gather(*tasks)
            await client.close()
        assert results == [t.split("STOP")[0] for t in texts]

    asyncio.run(main())
