"""The scheduler over a real in-process Engine (tiny random Llama): reuse, retraction, chunking,
overlap, abort, parallel samples and min_tokens, checked against each request run alone."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from radixserve.v1 import executor_pb2 as pb
from services.executor.sampling_params import SamplingParams
from services.scheduler.request import FinishReason
from tests.scheduler.harness import Result, generate, params, running_scheduler, wait_idle
from tests.scheduler.local_executor import EOS, link_for, rand_prompt


def slices_of(steps: list[pb.Step], request_id: str) -> list[tuple[int, pb.Slice]]:
    """(step index, slice) of every slice computed for request_id, over all its admissions."""
    out, row = [], None
    for i, step in enumerate(steps):
        if row in step.release_rows:
            row = None
        row = next((a.row for a in step.add if a.request_id == request_id), row)
        out += [(i, s) for s in step.slices if s.row == row]
    return out


def prefill_tokens(steps: list[pb.Step], request_id: str) -> int:
    return sum(len(s.input_ids) for _, s in slices_of(steps, request_id) if not s.use_last_sampled)


async def drain(stream) -> list:
    return [e async for e in stream.events()]


def ok(result) -> Result:
    assert isinstance(result, dict), result
    return result[0]


def test_prefix_reuse_computes_only_the_rest(hf, alone) -> None:
    prompt = rand_prompt(random.Random(1), 300)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link) as sched:
            first = ok(await generate(sched, params("a", prompt, 6)))
            second = ok(await generate(sched, params("b", prompt, 6)))
        assert first.tokens == second.tokens == alone(prompt, 6)
        assert first.cached_tokens == 0 and prefill_tokens(link.steps, "a") == 300
        assert second.cached_tokens >= 299
        assert prefill_tokens(link.steps, "b") == 300 - second.cached_tokens

    asyncio.run(main())


def test_second_turn_reuses_prompt_and_answer(hf, alone) -> None:
    rng = random.Random(2)
    turn1 = rand_prompt(rng, 120)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link) as sched:
            answer = ok(await generate(sched, params("t1", turn1, 20))).tokens
            turn2 = turn1 + answer + rand_prompt(rng, 15)
            second = ok(await generate(sched, params("t2", turn2, 10)))
        # The answer's last token has no KV yet when the request ends at max_tokens.
        assert second.cached_tokens >= len(turn1) + len(answer) - 1
        assert prefill_tokens(link.steps, "t2") == len(turn2) - second.cached_tokens
        assert second.tokens == alone(turn2, 10)

    asyncio.run(main())


@pytest.mark.parametrize("overlap", [True, False])
def test_retraction_resumes_with_the_same_tokens(hf, alone, overlap: bool) -> None:
    """8 requests need 8 × 100 slots from a pool of 500: some are retracted and come back."""
    rng = random.Random(3)
    prompts = [rand_prompt(rng, 40) for _ in range(8)]

    async def main() -> None:
        async with running_scheduler(
            link_for(hf, num_slots=500), disable_overlap_schedule=not overlap
        ) as sched:
            results = await asyncio.gather(
                *(
                    generate(sched, params(f"r{i}", p, 60, ignore_eos=True))
                    for i, p in enumerate(prompts)
                )
            )
            counters = sched.load().counters
        assert counters.retractions > 0
        assert counters.finished == len(prompts)
        for p, result in zip(prompts, results, strict=True):
            res = ok(result)
            assert res.complete is not None and res.complete.reason is FinishReason.LENGTH
            assert res.tokens == alone(p, 60)

    asyncio.run(main())


def test_chunked_prefill_keeps_others_decoding(hf, alone) -> None:
    rng = random.Random(4)
    short = [rand_prompt(rng, 10) for _ in range(3)]
    long = rand_prompt(rng, 256)  # 8 × the chunk size

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link, chunked_prefill_size=32) as sched:
            tasks = [
                asyncio.create_task(generate(sched, params(f"s{i}", p, 60)))
                for i, p in enumerate(short)
            ]
            while len(sched.running) < 3 or min(len(r.output) for r in sched.running) < 2:
                await asyncio.sleep(0.001)
            long_result = ok(await generate(sched, params("long", long, 4)))
            short_results = [ok(r) for r in await asyncio.gather(*tasks)]
        assert long_result.tokens == alone(long, 4)
        assert [r.tokens for r in short_results] == [alone(p, 60) for p in short]
        chunk_steps = [i for i, s in slices_of(link.steps, "long") if len(s.input_ids) > 1]
        assert len(chunk_steps) == 8
        for i in chunk_steps:  # every short request decodes in every step of the long prefill
            decoding = {s.row for s in link.steps[i].slices if s.use_last_sampled}
            assert len(decoding) == 3, f"step {i}: {len(decoding)} requests decoded"

    asyncio.run(main())


def test_overlap_on_and_off_give_identical_outputs(hf, alone) -> None:
    """Including requests ending on a stop token, where overlap computed one token too many."""
    rng = random.Random(5)
    prompts = [rand_prompt(rng, rng.randint(5, 60)) for _ in range(16)]
    stops = [frozenset({alone(p, 24)[k]}) if k % 2 else frozenset() for k, p in enumerate(prompts)]

    async def run(overlap: bool) -> tuple[list[Result], int]:
        link = link_for(hf)
        async with running_scheduler(link, disable_overlap_schedule=not overlap) as sched:
            results = await asyncio.gather(
                *(
                    generate(sched, params(f"o{i}", p, 24, stop_token_ids=s))
                    for i, (p, s) in enumerate(zip(prompts, stops, strict=True))
                )
            )
        return [ok(r) for r in results], link.max_in_flight

    async def main() -> None:
        with_overlap, in_flight_on = await run(True)
        without, in_flight_off = await run(False)
        assert (in_flight_on, in_flight_off) == (2, 1)
        assert [r.tokens for r in with_overlap] == [r.tokens for r in without]
        for p, s, res in zip(prompts, stops, with_overlap, strict=True):
            expected = alone(p, 24)
            cut = next((k for k, t in enumerate(expected) if t in s | {EOS}), None)
            if cut is not None:
                assert res.tokens == expected[:cut]
                assert res.complete.reason is FinishReason.STOP
                assert res.complete.completion_tokens == cut + 1
            else:
                assert res.tokens == expected and len(res.tokens) == 24
                assert res.complete.reason is FinishReason.LENGTH

    asyncio.run(main())


def test_abort_running_queued_and_unknown(hf, alone) -> None:
    rng = random.Random(6)
    prompts = [rand_prompt(rng, 30) for _ in range(3)]

    async def main() -> None:
        async with running_scheduler(link_for(hf), max_running_requests=2) as sched:
            streams = [
                sched.submit(params(f"a{i}", p, 100, ignore_eos=True))
                for i, p in enumerate(prompts)
            ]
            while not sched.running or len(sched.running[0].output) < 5:
                await asyncio.sleep(0.001)
            assert [r.rid for r in sched.waiting] == ["a2"]
            used = sched.load().kv.used
            assert sched.abort("a2") and sched.load().num_waiting == 0
            assert sched.abort("a0")
            assert sched.load().kv.used < used  # a0's slots are back in the cache or free
            assert not sched.abort("nope")
            events = [await drain(s) for s in streams]
        assert [e.reason for e in events[2]] == [FinishReason.ABORT]
        assert events[0][-1].reason is FinishReason.ABORT
        tokens0 = [t for e in events[0][:-1] for t in e.token_ids]
        assert 5 <= len(tokens0) < 100 and tokens0 == alone(prompts[0], 100)[: len(tokens0)]
        tokens1 = [t for e in events[1][:-1] for t in e.token_ids]
        assert tokens1 == alone(prompts[1], 100)

    asyncio.run(main())


def test_parallel_samples_share_the_prompt(hf, alone) -> None:
    prompt = rand_prompt(random.Random(7), 100)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link) as sched:
            results = await generate(sched, params("n4", prompt, 12, n=4, temperature=1.0, seed=5))
        assert isinstance(results, dict) and sorted(results) == [0, 1, 2, 3]
        assert [results[i].cached_tokens for i in range(4)] == [0, 99, 99, 99]
        assert prefill_tokens(link.steps, "n4/0") == 100
        assert [prefill_tokens(link.steps, f"n4/{i}") for i in (1, 2, 3)] == [1, 1, 1]
        for i in range(4):
            expected = alone(prompt, 12, SamplingParams(temperature=1.0, seed=5 + i))
            assert results[i].tokens == expected, f"sample {i}"
        assert len({tuple(results[i].tokens) for i in range(4)}) > 1

    asyncio.run(main())


@pytest.mark.parametrize("overlap", [True, False])
def test_min_tokens_holds_back_stop_tokens(hf, alone, overlap: bool) -> None:
    """Token 7 is pushed up by +50, so it is sampled as soon as the ban is lifted."""
    prompt = rand_prompt(random.Random(8), 20)

    async def main() -> None:
        async with running_scheduler(link_for(hf), disable_overlap_schedule=not overlap) as sched:
            p = params(
                "m", prompt, 10, min_tokens=3, stop_token_ids=frozenset({7}), logit_bias={7: 50.0}
            )
            res = ok(await generate(sched, p))
        banned = SamplingParams(temperature=0.0, logit_bias={7: -math.inf, EOS: -math.inf})
        assert res.tokens == alone(prompt, 3, banned)
        assert res.complete.reason is FinishReason.STOP and res.complete.matched_stop == 7
        assert res.complete.completion_tokens == 4

    asyncio.run(main())


def test_logprobs_stream_with_tokens(hf, alone) -> None:
    prompt = rand_prompt(random.Random(9), 12)

    async def main() -> None:
        async with running_scheduler(link_for(hf)) as sched:
            stream = sched.submit(params("lp", prompt, 5, logprobs=True, top_logprobs=3))
            chunks = [e async for e in stream.events()][:-1]
            await wait_idle(sched)
        tokens = [t for c in chunks for t in c.token_ids]
        top = [t for c in chunks for t in c.top_ids]
        assert tokens == alone(prompt, 5)
        assert len([x for c in chunks for x in c.logprobs]) == 5 and len(top) == 15
        assert top[::3] == tokens  # greedy picks the most likely alternative

    asyncio.run(main())
