"""Gateway → scheduler → gateway → tokenizer → gateway with real in-process gRPC servers: many
concurrent generations cost about one tokenizer message per scheduler batch, not per token."""

from __future__ import annotations

import asyncio

from services.gateway.clients import SchedulerClient, TokenizerClient
from services.gateway.generation import Generation
from services.gateway.metrics import RequestMetrics
from services.gateway.sampling import GenerationInput, SamplingParams, TextOptions
from tests.gateway.test_detokenize_stream import tokenizer_server
from tests.scheduler.fake_executor import FakeExecutor, reference
from tests.scheduler.grpc_server import scheduler_server


def test_concurrent_generations_share_messages_on_both_hops() -> None:
    num, tokens = 16, 20
    prompts = [[i + 1] * (2 + i % 3) for i in range(num)]

    async def text_of(gen: Generation) -> str:
        return "".join([out.text async for out in gen.outputs()])

    async def main() -> None:
        async with (
            scheduler_server(FakeExecutor(4096, 32, delay=0.002)) as (sched, _, s_addr),
            tokenizer_server() as (tok, _, t_addr),
        ):
            scheduler, tokenizer = SchedulerClient(s_addr), TokenizerClient([t_addr])
            sampling = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
            gens = [
                Generation(
                    GenerationInput(f"r{i}", p, sampling, TextOptions()),
                    scheduler,
                    tokenizer,
                    RequestMetrics.disabled(),
                    30.0,
                )
                for i, p in enumerate(prompts)
            ]
            texts = await asyncio.gather(*(text_of(g) for g in gens))
            steps = sched.counters.steps
            await scheduler.close()
            await tokenizer.close()
        for prompt, text in zip(prompts, texts, strict=True):
            assert text == "".join(chr(t) for t in reference(prompt, tokens)[0])
        # One feed per sample per scheduler batch, plus each sample's finishing feed.
        assert tok.received <= 2 * (steps + 2), (tok.received, steps)
        assert tok.received < num * tokens / 4

    asyncio.run(main())
