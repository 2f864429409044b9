"""Prompt logprobs through the scheduler and a real in-process engine (tiny random Llama): the
values equal Hugging Face's log-softmax whether the prefix was cached or not, in one slice or in
chunks, across retractions, and arrive once, in sample 0's first chunk."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from radixserve.v1 import scheduler_pb2 as spb
from services.scheduler import convert
from services.scheduler.errors import InvalidRequest
from services.scheduler.request import FinishReason, PromptLogprobs
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Chunk
from tests.executor.tiny import engine_for
from tests.scheduler.harness import Result, generate, params, running_scheduler
from tests.scheduler.local_executor import LocalExecutor, link_for, rand_prompt
from tests.scheduler.test_scheduler_engine import ok, slices_of

TOLERANCE = 1e-4
TOP = 3
ASK = dict(logprob_start_len=0, top_logprobs=TOP)


@pytest.fixture(scope="module")
def reference(hf):
    """HF's log-softmax [len - 1, vocab] of a prompt (memoized): row p predicts token p + 1."""
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def run(prompt: list[int]) -> torch.Tensor:
        key = tuple(prompt)
        if key not in memo:
            with torch.no_grad():
                logits = hf(torch.tensor([prompt])).logits[0].float()
            memo[key] = torch.log_softmax(logits[:-1], dim=-1)
        return memo[key]

    return run


def check_prompt(res: Result, ref: torch.Tensor, prompt: list[int], s: int, k: int = TOP) -> None:
    """`res` got the logprobs of prompt tokens max(s, 1).. equal to HF's, with k alternatives."""
    got = res.prompt
    assert got is not None and res.prompt_chunks == 1
    start = max(s, 1)
    assert got.start == start and len(got.logprobs) == len(prompt) - start
    rows = ref[start - 1 :]
    expected = rows.gather(1, torch.tensor(prompt[start:])[:, None]).squeeze(1)
    delta = (torch.tensor(got.logprobs) - expected).abs().max().item()
    assert delta < TOLERANCE, f"prompt logprobs differ from HF by {delta:.2e}"
    vals, ids = rows.topk(k, dim=-1)
    assert got.top_ids == ids.flatten().tolist()
    assert (torch.tensor(got.top_logprobs) - vals.flatten()).abs().max() < TOLERANCE


def admissions_asking(link: LocalExecutor, rid: str) -> int:
    """How many of rid's admissions computed slices with prompt logprobs."""
    asking, admission, row = set(), 0, None
    for step in link.steps:
        if row in step.release_rows:
            row = None
        for add in step.add:
            if add.request_id == rid:
                row, admission = add.row, admission + 1
        if any(s.row == row and s.HasField("logprob_start") for s in step.slices):
            asking.add(admission)
    return len(asking)


def flagged(link: LocalExecutor, rid: str) -> list[tuple[int, int, int, int | None]]:
    """(start, length, logprob_start, next_token_id) of each slice of rid with prompt logprobs."""
    return [
        (
            s.start,
            len(s.input_ids),
            s.logprob_start,
            s.next_token_id if s.HasField("next_token_id") else None,
        )
        for _, s in slices_of(link.steps, rid)
        if s.HasField("logprob_start")
    ]


def test_cache_miss_then_hit(hf, alone, reference) -> None:
    """A miss computes everything; a later request for the same prompt takes only the prefix
    before max(s - 1, 0) from the cache and recomputes the rest for its logits."""
    prompt = rand_prompt(random.Random(1), 120)
    ref = reference(prompt)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link) as sched:
            miss = ok(
                await generate(
                    sched, params("miss", prompt, 4, logprob_start_len=0, top_logprobs=TOP)
                )
            )
            hit = ok(
                await generate(
                    sched, params("hit", prompt, 4, logprob_start_len=50, top_logprobs=TOP)
                )
            )
            again = ok(
                await generate(
                    sched, params("again", prompt, 4, logprob_start_len=1, top_logprobs=TOP)
                )
            )
            plain = ok(await generate(sched, params("plain", prompt, 4)))
        check_prompt(miss, ref, prompt, 0)
        check_prompt(hit, ref, prompt, 50)
        check_prompt(again, ref, prompt, 1)
        assert (miss.cached_tokens, hit.cached_tokens, again.cached_tokens) == (0, 49, 0)
        assert plain.cached_tokens == 119 and plain.prompt is None  # no cap without the ask
        assert flagged(link, "miss") == [(0, 120, 0, None)]
        assert flagged(link, "hit") == [(49, 71, 49, None)]
        for res in (miss, hit, again, plain):
            assert res.tokens == alone(prompt, 4)
            assert res.complete is not None and res.complete.cached_tokens == res.cached_tokens

    asyncio.run(main())


def test_chunked_prefill_gives_the_same_values(hf, reference) -> None:
    """Chunks of 32: each non-final chunk carries the next chunk's first token."""
    prompt = rand_prompt(random.Random(2), 150)
    ref = reference(prompt)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link, chunked_prefill_size=32) as sched:
            cold = ok(
                await generate(
                    sched, params("cold", prompt, 3, logprob_start_len=40, top_logprobs=TOP)
                )
            )
            warm = ok(
                await generate(
                    sched, params("warm", prompt, 3, logprob_start_len=70, top_logprobs=TOP)
                )
            )
        check_prompt(cold, ref, prompt, 40)
        check_prompt(warm, ref, prompt, 70)
        assert warm.cached_tokens == 69
        # cold: positions 0..31 need no logprob; 32..63 from 39, with token 64 after them, ...
        assert flagged(link, "cold") == [
            (32, 32, 39, prompt[64]),
            (64, 32, 64, prompt[96]),
            (96, 32, 96, prompt[128]),
            (128, 22, 128, None),
        ]
        assert flagged(link, "warm") == [
            (69, 32, 69, prompt[101]),
            (101, 32, 101, prompt[133]),
            (133, 17, 133, None),
        ]

    asyncio.run(main())


def test_retraction_after_delivery_recomputes_nothing(hf, alone, reference) -> None:
    """Memory runs out while requests decode: a retracted one resumes from the cache and asks
    for no prompt logprobs again (it already streamed them)."""
    rng = random.Random(3)
    prompts = [rand_prompt(rng, 80) for _ in range(6)]

    async def main() -> tuple[list[Result], LocalExecutor, int]:
        link = link_for(hf, num_slots=400)
        async with running_scheduler(link, chunked_prefill_size=32) as sched:
            results = await asyncio.gather(
                *(
                    generate(sched, params(f"r{i}", p, 60, ignore_eos=True, **ASK))
                    for i, p in enumerate(prompts)
                )
            )
            retractions = sched.load().counters.retractions
        return [ok(r) for r in results], link, retractions

    results, link, retractions = asyncio.run(main())
    assert retractions > 0
    for i, (p, res) in enumerate(zip(prompts, results, strict=True)):
        check_prompt(res, reference(p), p, 0)
        assert res.tokens == alone(p, 60)
        assert admissions_asking(link, f"r{i}") == 1


class RetractingExecutor(LocalExecutor):
    """Retracts request `victim` as soon as the step carrying its `at`-th prompt-logprob slice
    is sent (as a failed forward elsewhere would: between steps, with steps in flight)."""

    def __init__(self, engine, victim: str, at: int) -> None:
        super().__init__(engine)
        self.victim, self.at, self.seen = victim, at, 0
        self.sched: Scheduler | None = None

    def send(self, step):
        fut = super().send(step)
        assert self.sched is not None
        [req] = [r for r in self.sched.running if r.rid == self.victim] or [None]
        if req is not None and any(
            s.row == req.row and s.HasField("logprob_start") for s in step.slices
        ):
            self.seen += 1
            if self.seen == self.at:
                self.sched._retract(req)
        return fut


@pytest.mark.parametrize("overlap", [True, False])
def test_retraction_during_prefill_keeps_what_came_back(hf, alone, reference, overlap) -> None:
    """Retracted while its third chunk is sent, a request keeps the values of the chunks whose
    results came back, and on its return computes (past its cache cap) only the rest."""
    prompt = rand_prompt(random.Random(6), 150)
    link = RetractingExecutor(engine_for(hf, num_slots=4096, max_rows=4), "victim", at=3)

    async def main() -> Result:
        async with running_scheduler(
            link, chunked_prefill_size=32, disable_overlap_schedule=not overlap
        ) as sched:
            link.sched = sched
            return ok(await generate(sched, params("victim", prompt, 5, **ASK)))

    res = asyncio.run(main())
    check_prompt(res, reference(prompt), prompt, 0)
    assert res.tokens == alone(prompt, 5)
    assert admissions_asking(link, "victim") == 2
    spans = flagged(link, "victim")
    # Chunks at 0, 32 and 64 (retracted); with overlap the result of the one at 32 was still in
    # flight, so it is asked for again too. The return matches the cache up to there.
    back = 32 if overlap else 64
    assert spans[:3] == [(0, 32, 0, prompt[32]), (32, 32, 32, prompt[64]), (64, 32, 64, prompt[96])]
    assert spans[3][:3] == (back, 32, back)
    assert sum(n for _, n, _, _ in spans) == 150 + 96 - back


def test_parallel_samples_and_edge_cases(hf, alone, reference) -> None:
    """n = 2: only sample 0 carries them. A one-token prompt has none to compute. A sample that
    ends on its first token (a stop token, never streamed) still gets them."""
    prompt = rand_prompt(random.Random(4), 30)
    stop = alone(prompt, 1)[0]

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link) as sched:
            pair = await generate(
                sched, params("pair", prompt, 3, n=2, logprob_start_len=0, top_logprobs=TOP)
            )
            one = ok(await generate(sched, params("one", [7], 2, logprob_start_len=0)))
            stopped = ok(
                await generate(
                    sched,
                    params(
                        "stop",
                        prompt,
                        5,
                        logprob_start_len=5,
                        stop_token_ids=frozenset({stop}),
                        top_logprobs=TOP,
                    ),
                )
            )
        assert isinstance(pair, dict)
        check_prompt(pair[0], reference(prompt), prompt, 0)
        assert pair[1].prompt is None
        assert one.prompt == PromptLogprobs(1) and one.prompt_chunks == 1 and len(one.tokens) == 2
        check_prompt(stopped, reference(prompt), prompt, 5)
        assert stopped.tokens == [] and stopped.complete.reason is FinishReason.STOP

    asyncio.run(main())


def test_validation_and_protobuf_edge() -> None:
    from services.scheduler.request import Limits

    limits = Limits(256, 512, 4096, 20, frozenset({255}))
    params("ok", [1, 2, 3], 4, logprob_start_len=2).validate(limits)
    for bad in (3, -2):
        with pytest.raises(InvalidRequest, match="logprob_start_len"):
            params("bad", [1, 2, 3], 4, logprob_start_len=bad).validate(limits)
    msg = spb.GenerateRequest(
        request_id="x", input_ids=[1, 2], sampling=spb.SamplingOptions(max_tokens=1, n=1, top_p=1)
    )
    assert convert.params_from_pb(msg).logprob_start_len == -1
    msg.logprob_start_len = 0
    assert convert.params_from_pb(msg).logprob_start_len == 0
    chunk = convert.event_to_pb(
        Chunk(0, [5], prompt=PromptLogprobs(1, [-1.5], [4, 5], [-0.1, -1.5]))
    ).chunk
    assert chunk.HasField("prompt_logprob_start") and chunk.prompt_logprob_start == 1
    assert list(chunk.prompt_logprobs) == [-1.5] and list(chunk.prompt_top_ids) == [4, 5]
    assert not convert.event_to_pb(Chunk(0, [5])).chunk.HasField("prompt_logprob_start")
