"""Multi-step decode (`StepInput.decode_steps`): one Step computes k positions per row, giving
exactly the tokens, logprobs and seeded draws of k one-step Steps; bad multi-step Steps are
rejected whole, and a row that fails leaves the later iterations while the others carry on."""

from __future__ import annotations

import random

import pytest

from services.common.grammar import GrammarSpec
from services.executor.engine import Engine
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput, StepOutput
from services.executor.validation import StepRejected
from tests.executor.grammar_vocab import grammar_engine
from tests.executor.tiny import engine_for, hf_model

PARAMS = [
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=1.0, top_p=0.9, seed=7, frequency_penalty=0.5),
    SamplingParams(temperature=0.8, top_k=20, seed=11, repetition_penalty=1.3, logprobs=True),
    SamplingParams(temperature=0.0, presence_penalty=0.7),
]
SPACE = 64  # slots per row


@pytest.fixture(scope="module")
def hf():
    return hf_model("llama")


def started(engine: Engine, seed: int = 0) -> list[int]:
    """Adds a row per PARAMS entry with a random prompt and prefills it; returns the position of
    each row's first decode."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(250) for _ in range(rng.randint(3, 20))] for _ in PARAMS]
    engine.run_step(
        StepInput(
            1,
            add=[
                NewRequest(r, f"r{r}", p, prompt)
                for r, (p, prompt) in enumerate(zip(PARAMS, prompts, strict=True))
            ],
            writes=[
                SlotWrite(r, 0, list(range(1 + SPACE * r, 1 + SPACE * (r + 1))))
                for r in range(len(PARAMS))
            ],
            slices=[Slice(r, 0, prompt) for r, prompt in enumerate(prompts)],
        )
    )
    return [len(p) for p in prompts]


def decode(step_id: int, starts: list[int], k: int = 1, rows: list[int] | None = None) -> StepInput:
    rows = list(range(len(starts))) if rows is None else rows
    slices = [Slice(r, starts[r], [], use_last_sampled=True) for r in rows]
    return StepInput(step_id, slices=slices, decode_steps=k)


def per_row(outputs: list[StepOutput]) -> dict[int, list[tuple]]:
    got: dict[int, list[tuple]] = {}
    for out in outputs:
        for t in out.tokens:
            got.setdefault(t.row, []).append((t.token_id, t.logprob, t.top_ids, t.top_logprobs))
    return got


def test_k_iterations_give_the_tokens_of_k_single_steps(hf) -> None:
    one, multi = engine_for(hf), engine_for(hf)
    starts = started(one)
    assert started(multi) == starts
    singles = [one.run_step(decode(2 + i, [s + i for s in starts])) for i in range(12)]
    steps = [multi.run_step(decode(2 + i, [s + 4 * i for s in starts], k=4)) for i in range(3)]
    # Iteration-major: every row once per iteration, in slice order.
    assert [t.row for t in steps[0].tokens] == list(range(len(PARAMS))) * 4
    assert all(not out.failed and not out.unwritten for out in steps)
    assert steps[0].num_tokens == 4 * len(PARAMS)
    expected, got = per_row(singles), per_row(steps)
    for row in expected:
        assert [x[0] for x in got[row]] == [x[0] for x in expected[row]], f"row {row}"
    # Same batches in the same order: the logprobs are the same numbers, not just close.
    assert str(got) == str(expected)


def test_end_decode_stops_a_step_after_the_iteration_in_progress(hf) -> None:
    """EndDecode before a Step starts leaves it one iteration; during its second iteration, two.
    The rows then go on from where it stopped with the tokens of single steps, and ending a Step
    of one iteration, or one already run, changes nothing."""
    one, multi = engine_for(hf), engine_for(hf)
    starts = started(one)
    started(multi)
    singles = [one.run_step(decode(2 + i, [s + i for s in starts])) for i in range(8)]
    multi.end_decode(2)
    first = multi.run_step(decode(2, starts, k=4))
    assert first.decode_iterations == 1 and len(first.tokens) == len(PARAMS)
    assert first.num_tokens == len(PARAMS)
    computed = multi._compute
    calls = 0

    def ends_during_the_second(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 2:
            multi.end_decode(3)  # as EndDecode arrives while iteration 1 computes
        return computed(*args)

    multi._compute = ends_during_the_second  # type: ignore[method-assign]
    second = multi.run_step(decode(3, [s + 1 for s in starts], k=4))
    multi._compute = computed  # type: ignore[method-assign]
    assert second.decode_iterations == 2 and len(second.tokens) == 2 * len(PARAMS)
    multi.end_decode(3)  # answered already: the next Steps run whole
    third = multi.run_step(decode(4, [s + 3 for s in starts], k=4))
    assert third.decode_iterations == 4
    multi.end_decode(5)
    fourth = multi.run_step(decode(5, [s + 7 for s in starts]))
    assert fourth.decode_iterations == 0 and len(fourth.tokens) == len(PARAMS)
    assert str(per_row([first, second, third, fourth])) == str(per_row(singles))


def test_a_multi_step_with_a_prefill_or_past_the_context_is_rejected_whole(hf) -> None:
    engine = engine_for(hf)
    starts = started(engine)
    mixed = decode(2, starts, k=2)
    mixed.slices[0] = Slice(0, starts[0], [5, 6])
    with pytest.raises(StepRejected, match="not a sampled decode"):
        engine.run_step(mixed)
    ctx = engine.limits.context_length
    with pytest.raises(StepRejected, match="past the context length"):
        engine.run_step(decode(3, starts, k=ctx - starts[0] + 1, rows=[0]))
    with pytest.raises(StepRejected, match="not positive"):
        engine.run_step(decode(4, starts, k=0))
    # Nothing was applied: the rows go on exactly where they were.
    assert len(engine.run_step(decode(5, starts, k=2)).tokens) == 2 * len(PARAMS)


def test_a_row_with_a_grammar_cannot_decode_several_steps() -> None:
    engine = grammar_engine()
    greedy = SamplingParams(temperature=0.0)
    engine.run_step(
        StepInput(
            1,
            add=[
                NewRequest(0, "free", greedy, [1, 2]),
                NewRequest(1, "json", greedy, [3, 4], grammar=GrammarSpec("regex", "[0-9]+")),
            ],
            writes=[SlotWrite(r, 0, list(range(1 + 20 * r, 21 + 20 * r))) for r in (0, 1)],
            slices=[Slice(0, 0, [1, 2]), Slice(1, 0, [3, 4])],
        )
    )
    with pytest.raises(StepRejected, match="row 1 has a grammar"):
        engine.run_step(decode(2, [2, 2], k=3))
    assert len(engine.run_step(decode(3, [2, 2], k=1)).tokens) == 2  # nothing was applied
    assert len(engine.run_step(decode(4, [3], k=3, rows=[0])).tokens) == 3


def test_a_failing_row_leaves_the_later_iterations_and_the_others_carry_on(hf) -> None:
    engine, alone = engine_for(hf), engine_for(hf)
    starts = started(engine)
    assert started(alone) == starts
    engine.fault_request_id, engine.fault_stage = "r2", "forward"
    out = engine.run_step(decode(2, starts, k=3))
    width = len(PARAMS)
    assert sorted(out.failed) == [2, 2 + width, 2 + 2 * width]
    assert set(out.unwritten) == {2}
    healthy = [r for r in range(width) if r != 2]
    for i, t in enumerate(out.tokens):
        assert t.row == i % width
    # The other rows' tokens are those they decode without the failing row.
    reference = per_row([alone.run_step(decode(2, starts, k=3, rows=healthy))])
    got = per_row([out])
    for row in healthy:
        assert [x[0] for x in got[row]] == [x[0] for x in reference[row]]
    assert engine.fault_request_id is not None
    engine.fault_request_id = None
    # The failing row's state is as its failure left it; the others go on.
    more = engine.run_step(decode(3, [s + 3 for s in starts], k=2, rows=healthy))
    assert len(more.tokens) == 2 * len(healthy) and not more.failed
