"""--num-continuous-decode-steps over a real in-process Engine (tiny random Llama): the same
tokens as one decode per Step, stop tokens and max_tokens honoured mid-Step, every slot given
back, and single steps whenever a request waits or needs the scheduler between tokens."""

from __future__ import annotations

import asyncio
import math
import random
import threading

import pytest

from radixserve.v1 import executor_pb2 as pb
from services.common.grammar import GrammarSpec
from services.scheduler.decode import continuous_steps
from services.scheduler.request import FinishReason, GenerateParams, Req
from services.scheduler.step import result_from_pb
from services.scheduler.streams import Failure, OutputStream
from tests.executor.tiny import engine_for
from tests.scheduler.harness import Result, generate, params, running_scheduler, wait_idle
from tests.scheduler.local_executor import EOS, LocalExecutor, link_for, rand_prompt

K = 4


def ok(result) -> Result:
    assert isinstance(result, dict), result
    return result[0]


def multi_steps(steps: list[pb.Step]) -> list[pb.Step]:
    return [s for s in steps if s.decode_steps > 1]


class NothingBehindMulti(LocalExecutor):
    """Fails a Step sent while a multi-iteration Step is still unanswered."""

    def __init__(self, hf) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine_for(hf, num_slots=2048, max_rows=16))
        self.pending: list[pb.Step] = []

    def send(self, step: pb.Step):  # type: ignore[no-untyped-def]
        assert not multi_steps(self.pending), "a Step was queued behind a multi-iteration Step"
        self.pending.append(step)
        fut = super().send(step)
        fut.add_done_callback(lambda _: self.pending.remove(step))
        return fut


def test_continuous_decode_gives_the_tokens_of_one_decode_per_step(hf, alone) -> None:
    """Greedy requests (half end on a stop token, mid-Step) and seeded sampled ones with
    penalties and logprobs, with overlap on and off: the tokens of single steps, finish reasons
    included, and every KV slot back once they end."""
    rng = random.Random(21)
    prompts = [rand_prompt(rng, rng.randint(5, 60)) for _ in range(10)]
    lengths = [rng.randint(3, 30) for _ in prompts]
    stops = [
        frozenset({alone(p, n)[n // 2]}) if k % 2 else frozenset()
        for k, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]
    sampled = [
        dict(temperature=1.0, top_p=0.9, seed=100 + i, frequency_penalty=0.4, logprobs=True)
        for i in range(4)
    ]

    async def run(steps: int, overlap: bool) -> tuple[list[Result], list[pb.Step]]:
        link = NothingBehindMulti(hf)
        async with running_scheduler(
            link, num_continuous_decode_steps=steps, disable_overlap_schedule=not overlap
        ) as sched:
            greedy = [
                generate(sched, params(f"g{i}", p, n, stop_token_ids=s))
                for i, (p, n, s) in enumerate(zip(prompts, lengths, stops, strict=True))
            ]
            drawn = [
                generate(sched, params(f"s{i}", prompts[i], 25, ignore_eos=True, **kw))
                for i, kw in enumerate(sampled)
            ]
            results = [ok(r) for r in await asyncio.gather(*greedy, *drawn)]
            await wait_idle(sched)
            stats = sched.cache.stats()
            assert stats.used == 0 and stats.free + stats.evictable == stats.total
        return results, link.steps

    async def main() -> None:
        single, single_steps = await run(1, overlap=True)
        assert not multi_steps(single_steps)
        for overlap in (True, False):
            results, steps = await run(K, overlap)
            assert multi_steps(steps), "no Step ran several decode iterations"
            for step in multi_steps(steps):
                assert not step.add and all(s.use_last_sampled for s in step.slices)
            for res, ref in zip(results, single, strict=True):
                assert res.tokens == ref.tokens
                assert res.complete.reason is ref.complete.reason
                assert res.complete.completion_tokens == ref.complete.completion_tokens
                assert all(
                    math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)
                    for a, b in zip(res.logprobs, ref.logprobs, strict=True)
                )
        for p, n, s, res in zip(prompts, lengths, stops, single[: len(prompts)], strict=True):
            expected = alone(p, n)
            cut = next((k for k, t in enumerate(expected) if t in s | {EOS}), None)
            assert res.tokens == (expected if cut is None else expected[:cut])
            assert res.complete.reason is (
                FinishReason.LENGTH if cut is None else FinishReason.STOP
            )

    asyncio.run(main())


def test_a_waiting_request_is_admitted_by_a_single_step(hf, alone) -> None:
    """A request arriving while others decode several tokens a Step joins in a Step of one
    iteration, and gets its own tokens."""
    rng = random.Random(22)
    first = [rand_prompt(rng, 20) for _ in range(3)]
    late = rand_prompt(rng, 30)

    async def main() -> None:
        link = link_for(hf)
        async with running_scheduler(link, num_continuous_decode_steps=K) as sched:
            tasks = [
                asyncio.create_task(generate(sched, params(f"f{i}", p, 40, ignore_eos=True)))
                for i, p in enumerate(first)
            ]
            while len(multi_steps(link.steps)) < 2:
                await asyncio.sleep(0.001)
            joined = ok(await generate(sched, params("late", late, 6, ignore_eos=True)))
            results = [ok(r) for r in await asyncio.gather(*tasks)]
        assert joined.tokens == alone(late, 6)
        assert [r.tokens for r in results] == [alone(p, 40) for p in first]
        adds = [s for s in link.steps if any(a.request_id == "late" for a in s.add)]
        assert len(adds) == 1 and adds[0].decode_steps <= 1
        # It decoded in multi-step Steps too, once nothing waited.
        late_row = adds[0].add[0].row
        after = link.steps[link.steps.index(adds[0]) :]
        assert any(s.decode_steps > 1 and late_row in [x.row for x in s.slices] for s in after)

    asyncio.run(main())


class HoldsAMultiStep(LocalExecutor):
    """Holds the first multi-iteration Step back on the worker until `release` is set, and
    records every result."""

    def __init__(self, hf) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine_for(hf, num_slots=2048, max_rows=16))
        self.held = threading.Event()  # set once that Step waits
        self.release = threading.Event()
        self.results: dict[int, pb.StepResult] = {}

    def _run(self, data: bytes) -> pb.StepResult:
        step = pb.Step.FromString(data)
        if step.decode_steps > 1 and not self.held.is_set():
            self.held.set()
            assert self.release.wait(30)
        result = super()._run(data)
        self.results[step.step_id] = result
        return result


def test_an_arrival_ends_a_multi_iteration_step_after_its_iteration(hf, alone) -> None:
    """A request arriving while a Step of K iterations is in flight has the scheduler call
    EndDecode: the Step stops after one iteration, the arrival joins in the very next Step, the
    decoding requests give back the slots of the iterations not run and keep their tokens, one
    aborted meanwhile and one whose last token is that iteration's end cleanly (integrity is
    checked after every Step), and every slot is free at the end."""
    rng = random.Random(23)
    first = [rand_prompt(rng, 20) for _ in range(4)]
    lengths = [40, 40, 40, 2]  # f3's second token is the held Step's first iteration
    late = rand_prompt(rng, 30)

    async def main() -> None:
        link = HoldsAMultiStep(hf)
        async with running_scheduler(link, num_continuous_decode_steps=8) as sched:
            tasks = [
                asyncio.create_task(generate(sched, params(f"f{i}", p, n, ignore_eos=True)))
                for i, (p, n) in enumerate(zip(first, lengths, strict=True))
            ]
            while not link.held.is_set():
                await asyncio.sleep(0.001)
            assert sched.abort("f2")
            arrival = asyncio.create_task(generate(sched, params("late", late, 6, ignore_eos=True)))
            await asyncio.sleep(0.01)
            held = multi_steps(link.steps)[0]
            assert link.ended == [held.step_id]
            link.release.set()
            joined = ok(await arrival)
            results = [ok(r) for r in await asyncio.gather(*tasks)]
            assert results[2].complete.reason is FinishReason.ABORT
            assert results[3].complete.reason is FinishReason.LENGTH
            await wait_idle(sched)
            stats = sched.cache.stats()
            assert stats.used == 0 and stats.free + stats.evictable == stats.total
        assert link.results[held.step_id].decode_iterations == 1
        assert len(link.results[held.step_id].token_ids) == len(held.slices)
        after = link.steps[link.steps.index(held) + 1]
        assert [a.request_id for a in after.add] == ["late"]
        # The held rows still running go on from the position after the one iteration run.
        row_of = {a.request_id: a.row for s in link.steps[: link.steps.index(held)] for a in s.add}
        going_on = {row_of["f0"], row_of["f1"]}
        held_starts = {x.row: x.start for x in held.slices if x.row in going_on}
        next_starts = {x.row: x.start for x in after.slices if x.row in going_on}
        assert next_starts == {row: start + 1 for row, start in held_starts.items()}
        assert held.decode_steps == 8 and len(held.slices) == 4
        assert joined.tokens == alone(late, 6)
        for i in (0, 1, 3):
            assert results[i].tokens == alone(first[i], lengths[i])

    asyncio.run(main())


def test_aborting_every_request_of_a_multi_iteration_step_ends_it(hf) -> None:
    """Aborting the requests a held Step of K iterations decodes ends it after one iteration
    (EndDecode), and aborting one of two does not."""
    rng = random.Random(24)
    prompts = [rand_prompt(rng, 20) for _ in range(2)]

    async def main() -> None:
        link = HoldsAMultiStep(hf)
        async with running_scheduler(link, num_continuous_decode_steps=8) as sched:
            tasks = [
                asyncio.create_task(generate(sched, params(f"a{i}", p, 40, ignore_eos=True)))
                for i, p in enumerate(prompts)
            ]
            while not link.held.is_set():
                await asyncio.sleep(0.001)
            held = multi_steps(link.steps)[0]
            assert sched.abort("a0") and link.ended == []
            assert sched.abort("a1") and link.ended == [held.step_id]
            link.release.set()
            results = [ok(r) for r in await asyncio.gather(*tasks)]
            await wait_idle(sched)
            assert sched.cache.stats().used == 0
        assert [r.complete.reason for r in results] == [FinishReason.ABORT] * 2
        assert link.results[held.step_id].decode_iterations == 1

    asyncio.run(main())


class FailsLate(LocalExecutor):
    """Reports the forward of request `target`'s row as failed at the last iteration of a
    multi-iteration Step: of the Step that reaches its max_tokens (`at_end`), else of the first,
    as an executor does when that iteration's forward fails for that row alone."""

    def __init__(self, hf, target: str, max_tokens: int, at_end: bool) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine_for(hf, num_slots=2048, max_rows=16))
        self.target, self.max_tokens, self.at_end = target, max_tokens, at_end
        self.row: int | None = None
        self.sampled = 0  # the target's tokens so far
        self.injected = False

    def _run(self, data: bytes) -> pb.StepResult:
        step = pb.Step.FromString(data)
        self.row = next((a.row for a in step.add if a.request_id == self.target), self.row)
        result = super()._run(data)
        rows = [s.row for s in step.slices]
        late = step.decode_steps > 1 and self.row in rows and not self.injected
        if late and (not self.at_end or self.sampled + step.decode_steps > self.max_tokens):
            self._fail_last_iteration(result, rows.index(self.row), len(rows), step.decode_steps)
        self.sampled += sum(1 for r in result.rows if r == self.row)
        return result

    def _fail_last_iteration(self, result: pb.StepResult, slot: int, width: int, k: int) -> None:
        self.injected = True
        index = (k - 1) * width + slot
        result.token_ids[index] = 0
        failed = dict(zip(result.failed, result.failed_reasons, strict=True))
        failed[index] = "RuntimeError: injected"
        del result.failed[:], result.failed_reasons[:]
        result.failed.extend(sorted(failed))
        result.failed_reasons.extend(failed[i] for i in sorted(failed))
        result.unwritten_rows.append(result.rows[index])
        result.unwritten_reasons.append("RuntimeError: injected")


@pytest.mark.parametrize("at_end", [True, False])
def test_a_row_failing_at_a_later_iteration_fails_only_if_still_running(
    hf, alone, at_end: bool
) -> None:
    """A row whose forward fails at an iteration after its request reached max_tokens leaves
    the request complete; failing before, only that request fails. Either way the other
    request gets its tokens and every slot comes back."""
    rng = random.Random(23)
    prompts = [rand_prompt(rng, 20) for _ in range(2)]
    n = 7  # 1 from the prefill, then 4 + 2 of the second multi-iteration step (2 computed after)

    async def main() -> None:
        link = FailsLate(hf, "victim", n, at_end)
        async with running_scheduler(link, num_continuous_decode_steps=K) as sched:
            victim, other = await asyncio.gather(
                generate(sched, params("victim", prompts[0], n, ignore_eos=True)),
                generate(sched, params("other", prompts[1], 20, ignore_eos=True)),
            )
            await wait_idle(sched)
            stats = sched.cache.stats()
            assert stats.used == 0 and stats.free + stats.evictable == stats.total
        assert link.injected
        assert ok(other).tokens == alone(prompts[1], 20)
        if at_end:
            assert ok(victim).tokens == alone(prompts[0], n)
            assert ok(victim).complete.reason is FinishReason.LENGTH
        else:
            assert isinstance(victim, Failure) and "the forward pass failed" in victim.message

    asyncio.run(main())


def req(prompt_len: int = 10, **kw: object) -> Req:
    p = params("r", list(range(prompt_len)), 100)
    r = Req.create(
        GenerateParams(**{**p.__dict__, **kw}),
        0,
        OutputStream(1, prompt_len, False),
        frozenset(),
        0,
    )
    r.row, r.num_computed, r.prefill_len = 0, prompt_len, prompt_len
    return r


def test_continuous_steps_only_when_every_decoding_request_just_decodes() -> None:
    plain = [req(), req(30)]
    assert continuous_steps(plain, 8, free_slots=1000, context=512) == 8
    assert continuous_steps(plain, 1, free_slots=1000, context=512) == 1
    # Bounded by the context left to the longest request, and by the free slots shared.
    assert continuous_steps(plain, 8, free_slots=1000, context=35) == 5
    assert continuous_steps(plain, 8, free_slots=7, context=512) == 3
    grammar = req(grammar=GrammarSpec("regex", "[0-9]+"))
    assert continuous_steps([*plain, grammar], 8, 1000, 512) == 1
    banned = req()
    banned.banned = True
    assert continuous_steps([*plain, banned], 8, 1000, 512) == 1
    forced = req()
    forced.explicit_next = True
    assert continuous_steps([*plain, forced], 8, 1000, 512) == 1
    # A request that decodes no more (its last token is in flight) does not hold the others back.
    done = req()
    done.num_scheduled_outputs = done.stop.max_tokens
    assert continuous_steps([*plain, done], 8, 1000, 512) == 8
    # Never past the most tokens any of them may still sample.
    for r, left in zip(plain, (2, 3), strict=True):
        r.num_scheduled_outputs = r.stop.max_tokens - left
    assert continuous_steps(plain, 8, 1000, 512) == 3


def test_failed_entries_carry_no_top_alternatives() -> None:
    """A failed row's placeholder entries (one per later iteration) hold no top alternatives,
    so the entries after them keep their own."""
    msg = pb.StepResult(
        step_id=1,
        rows=[0, 1, 0, 1],
        token_ids=[5, 0, 6, 0],
        logprobs=[-0.1, 0.0, -0.2, 0.0],
        top_ids=[5, 9, 6, 8],
        top_logprobs=[-0.5, -2.0, -0.25, -3.0],
        failed=[1, 3],
        failed_reasons=["x", "x"],
    )
    tokens = result_from_pb(msg, [2, 2, 2, 2]).tokens
    assert [t.top_ids for t in tokens] == [[5, 9], [], [6, 8], []]
    assert [t.top_logprobs for t in tokens] == [[-0.5, -2.0], [], [-0.25, -3.0], []]
