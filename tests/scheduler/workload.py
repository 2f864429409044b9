"""Random request mixes for the scheduler, and the checks every finished request must pass."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from services.scheduler.request import FinishReason
from services.scheduler.scheduler import Scheduler
from services.scheduler.streams import Failure
from tests.scheduler.fake_executor import reference
from tests.scheduler.harness import Result, collect, params


@dataclass(frozen=True)
class Spec:
    rid: str
    prompt: list[int]
    max_tokens: int
    stops: frozenset[int] = frozenset()
    min_tokens: int = 0
    n: int = 1
    delay: float = 0.0  # seconds before submitting
    abort_after: float | None = None  # seconds after submitting


def random_specs(
    rng: random.Random, count: int, max_prompt: int = 60, max_tokens: int = 30
) -> list[Spec]:
    """Prompts share a few system-prompt prefixes; some have stop tokens, min_tokens, n > 1, aborts."""
    systems = [[rng.randrange(250) for _ in range(rng.randint(8, 40))] for _ in range(3)]
    specs = []
    for i in range(count):
        prefix = rng.choice(systems) if rng.random() < 0.6 else []
        prompt = prefix + [rng.randrange(250) for _ in range(rng.randint(1, max_prompt))]
        stops = frozenset(rng.sample(range(250), 4)) if rng.random() < 0.4 else frozenset()
        specs.append(
            Spec(
                rid=f"q{i}",
                prompt=prompt,
                max_tokens=rng.randint(1, max_tokens),
                stops=stops,
                min_tokens=rng.randint(0, 6) if stops and rng.random() < 0.5 else 0,
                n=rng.choice([1, 1, 1, 1, 2, 3]),
                delay=rng.random() * 0.05,
                abort_after=rng.random() * 0.05 if rng.random() < 0.1 else None,
            )
        )
    return [
        s if s.min_tokens <= s.max_tokens else Spec(**{**s.__dict__, "min_tokens": 0})
        for s in specs
    ]


async def run_spec(sched: Scheduler, spec: Spec) -> dict[int, Result]:
    await asyncio.sleep(spec.delay)
    p = params(
        spec.rid,
        spec.prompt,
        spec.max_tokens,
        n=spec.n,
        min_tokens=spec.min_tokens,
        stop_token_ids=spec.stops,
        ignore_eos=True,
    )
    stream = sched.submit(p)
    if spec.abort_after is not None:
        asyncio.get_running_loop().call_later(spec.abort_after, sched.abort, spec.rid)
    results = await collect(stream)
    assert not isinstance(results, Failure), results
    check_results(spec, results)
    return results


def check_results(spec: Spec, results: dict[int, Result]) -> None:
    expected, stop = reference(spec.prompt, spec.max_tokens, spec.stops, spec.min_tokens)
    assert sorted(results) == list(range(spec.n)), f"{spec.rid}: samples {sorted(results)}"
    for index, res in results.items():
        done = res.complete
        assert done is not None, f"{spec.rid}/{index} never completed"
        if done.reason is FinishReason.ABORT:
            assert spec.abort_after is not None
            assert res.tokens == expected[: len(res.tokens)], (
                f"{spec.rid}/{index}: wrong tokens before abort"
            )
            continue
        assert res.tokens == expected, f"{spec.rid}/{index}: {res.tokens} != {expected}"
        assert done.matched_stop == stop
        assert done.reason is (FinishReason.STOP if stop is not None else FinishReason.LENGTH)
        assert done.completion_tokens == len(expected) + (stop is not None)


async def run_all(sched: Scheduler, specs: list[Spec], timeout: float) -> list[dict[int, Result]]:
    return await asyncio.wait_for(asyncio.gather(*(run_spec(sched, s) for s in specs)), timeout)
