"""Requests with a grammar through the scheduler and a real in-process engine (tiny model, byte
vocabulary): they wait for their grammar without holding others up, fail early when it does not
compile, and finish with STOP when it is complete."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

from services.common.grammar import GrammarSpec
from services.scheduler.request import FinishReason
from services.scheduler.streams import Failure
from tests.executor.grammar_vocab import EOS, grammar_engine, text
from tests.scheduler.harness import Result, collect, params, running_scheduler
from tests.scheduler.local_executor import LocalExecutor

REGEX = r"(yes|no)-[0-9]{2,3}"


def constrained(rid: str, prompt: list[int], spec: GrammarSpec, max_tokens: int = 40, **kw: object):
    return dataclasses.replace(params(rid, prompt, max_tokens, **kw), grammar=spec)


async def _a_grammar_being_compiled_does_not_hold_other_requests_up() -> None:
    link = LocalExecutor(grammar_engine(), eos=EOS)
    link.compile_gate = asyncio.Event()
    async with running_scheduler(link) as sched:
        held = asyncio.create_task(
            collect(sched.submit(constrained("g", [1, 2, 3], GrammarSpec("regex", REGEX))))
        )
        free = await collect(sched.submit(params("f", [4, 5, 6], 8, ignore_eos=True)))
        assert isinstance(free, dict) and len(free[0].tokens) == 8
        assert not held.done() and sched.waiting  # still compiling, never admitted
        assert all(a.request_id != "g" for s in link.steps for a in s.add)
        link.compile_gate.set()
        result = await held
    assert isinstance(result, dict)
    sample: Result = result[0]
    assert re.fullmatch(REGEX, text(sample.tokens))
    assert sample.complete is not None and sample.complete.reason is FinishReason.STOP


async def _an_invalid_grammar_fails_its_request_before_any_token() -> None:
    link = LocalExecutor(grammar_engine(), eos=EOS)
    async with running_scheduler(link) as sched:
        bad = sched.submit(constrained("bad", [1, 2], GrammarSpec("regex", "a(b"), n=2))
        good = sched.submit(constrained("good", [1, 2], GrammarSpec("regex", "[xy]{4}")))
        failed, ok = await asyncio.gather(collect(bad), collect(good))
    assert isinstance(failed, Failure) and failed.code == 3
    assert "parenthesis is not closed" in failed.message
    assert all(a.request_id not in ("bad", "bad/0", "bad/1") for s in link.steps for a in s.add)
    assert isinstance(ok, dict) and re.fullmatch("[xy]{4}", text(ok[0].tokens))
    assert "bad" not in sched.groups


async def _a_grammar_ends_its_request_even_with_ignore_eos_and_compiles_once() -> None:
    link = LocalExecutor(grammar_engine(), eos=EOS)
    spec = GrammarSpec.choice(["alpha", "beta"])
    async with running_scheduler(link) as sched:
        results = await asyncio.gather(
            *(
                collect(sched.submit(constrained(f"r{i}", [i + 1, 9], spec, ignore_eos=True, n=2)))
                for i in range(3)
            )
        )
        assert len(link.compiled) == 1  # later requests found it compiled on this connection
    for result in results:
        assert isinstance(result, dict)
        for sample in result.values():
            assert text(sample.tokens) in ("alpha", "beta") and EOS not in sample.tokens
            assert sample.complete is not None and sample.complete.reason is FinishReason.STOP


async def _aborting_a_request_while_its_grammar_compiles() -> None:
    link = LocalExecutor(grammar_engine(), eos=EOS)
    link.compile_gate = asyncio.Event()
    async with running_scheduler(link) as sched:
        stream = sched.submit(constrained("a", [1, 2], GrammarSpec("regex", REGEX)))
        assert sched.abort("a")
        link.compile_gate.set()
        result = await collect(stream)
        await asyncio.sleep(0.05)
    assert isinstance(result, dict) and result[0].complete.reason is FinishReason.ABORT
    assert not sched.waiting and "a" not in sched.groups


def test_a_grammar_being_compiled_does_not_hold_other_requests_up() -> None:
    asyncio.run(_a_grammar_being_compiled_does_not_hold_other_requests_up())


def test_an_invalid_grammar_fails_its_request_before_any_token() -> None:
    asyncio.run(_an_invalid_grammar_fails_its_request_before_any_token())


def test_a_grammar_ends_its_request_even_with_ignore_eos_and_compiles_once() -> None:
    asyncio.run(_a_grammar_ends_its_request_even_with_ignore_eos_and_compiles_once())


def test_aborting_a_request_while_its_grammar_compiles() -> None:
    asyncio.run(_aborting_a_request_while_its_grammar_compiles())


JUMPY = r'\{"kind": "(cat|dog)", "legs": [0-9], "note": "[a-z ]{3,8}"\}'


async def _jump_forward_run(
    jump: bool, overlap: bool, max_rows: int = 16, num_slots: int = 4096, bet: float = 1.0
):
    engine = grammar_engine(max_rows, num_slots)
    link = LocalExecutor(engine, eos=EOS)
    cfg = {
        "disable_jump_forward": not jump,
        "disable_overlap_schedule": not overlap,
        "schedule_conservativeness": bet,
    }
    specs = [GrammarSpec("regex", JUMPY), GrammarSpec.json_schema(SCHEMA)]
    # Compiled ahead, so all six requests are admitted together: with a slow compile (a busy
    # machine), the regex answers could finish before the JSON ones start, and the tight runs
    # would not run out of slots.
    for spec in specs:
        engine.grammar.compile(spec)
    async with running_scheduler(link, **cfg) as sched:
        streams = [
            sched.submit(constrained(f"r{i}", [i + 1, 7, 9], specs[i % 2], n=1, max_tokens=80))
            for i in range(6)
        ]
        results = await asyncio.gather(*(collect(s) for s in streams))
        retractions = sched.counters.retractions
    sampled = sum(len(s.slices) for s in link.steps)
    return [r[0].tokens for r in results], sampled, retractions


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
}


def test_jump_forward_gives_the_same_tokens_in_fewer_forward_passes() -> None:
    """With one byte per token, the forced text has one tokenization, so greedy answers must be
    identical with and without jump-forward, with and without overlap."""
    plain, plain_slices, _ = asyncio.run(_jump_forward_run(jump=False, overlap=True))
    for i, tokens in enumerate(plain):
        answer = text(tokens)
        if i % 2 == 0:
            assert re.fullmatch(JUMPY, answer), answer
        else:
            assert set(json.loads(answer)) == {"ok", "n"}
    for overlap in (True, False):
        jumped, jumped_slices, _ = asyncio.run(_jump_forward_run(jump=True, overlap=overlap))
        assert jumped == plain
        assert jumped_slices < 0.6 * plain_slices  # most of these answers are forced text
    # Too few KV slots for all six at once: requests are retracted mid-answer, forced tokens
    # and all, and resume where they were.
    for slots, overlap in ((160, True), (120, False)):
        tight, _, retractions = asyncio.run(
            _jump_forward_run(jump=True, overlap=overlap, num_slots=slots, bet=0.02)
        )
        assert retractions > 0 and tight == plain
