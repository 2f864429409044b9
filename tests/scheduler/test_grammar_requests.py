"""Requests with a grammar through the scheduler and a real in-process engine (tiny model, byte
vocabulary): they wait for their grammar without holding others up, fail early when it does not
compile, and finish with STOP when it is complete."""

from __future__ import annotations

import asyncio
import dataclasses
import re

from services.common.grammar import GrammarSpec
from services.scheduler.request import FinishReason
from services.scheduler.streams import Failure
from tests.executor.grammar_vocab import EOS, grammar_engine, text
from tests.scheduler.harness import Result, collect, params, running_scheduler
from tests.scheduler.local_executor import LocalExecutor

REGEX = r"(yes|no)-[0-9]{2,3}"


def constrained(rid: str, prompt: list[int], spec: GrammarSpec, **kw: object):
    return dataclasses.replace(params(rid, prompt, 40, **kw), grammar=spec)


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
