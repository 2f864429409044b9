"""Steps prepared ahead of the forward (as the servicer does) behave as steps run one by one."""

from __future__ import annotations

import pytest

from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.validation import StepRejected
from tests.executor.tiny import engine_for, hf_model

PARAMS = [
    SamplingParams(temperature=0),
    SamplingParams(
        temperature=0.8, top_p=0.9, presence_penalty=0.5, repetition_penalty=1.2, seed=4
    ),
]
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 3]]


def steps() -> list[StepInput]:
    first = StepInput(
        1,
        add=[NewRequest(r, f"r{r}", PARAMS[r], PROMPTS[r]) for r in range(2)],
        writes=[SlotWrite(0, 0, list(range(1, 17))), SlotWrite(1, 0, list(range(20, 36)))],
        slices=[Slice(r, 0, PROMPTS[r]) for r in range(2)],
    )
    decodes = [
        StepInput(2 + i, slices=[Slice(r, len(PROMPTS[r]) + i, [], True) for r in range(2)])
        for i in range(6)
    ]
    return [first, *decodes, StepInput(8, release_rows=[0, 1])]


def tokens(outputs) -> list[list[int]]:
    return [[t.token_id for t in out.tokens] for out in outputs]


def test_preparing_every_step_first_gives_the_tokens_of_running_one_by_one() -> None:
    hf = hf_model("llama")
    one_by_one = engine_for(hf, max_rows=4)
    expected = tokens([one_by_one.run_step(s) for s in steps()])
    ahead = engine_for(hf, max_rows=4)
    prepared = [ahead.prepare(s) for s in steps()]
    assert ahead.rows == {}  # preparing applies nothing
    assert tokens([ahead.execute(p) for p in prepared]) == expected
    assert ahead.rows == {} and ahead.planned == {}


def test_a_step_rejected_while_preparing_leaves_the_plan_and_state_alone() -> None:
    engine = engine_for(hf_model("llama"), max_rows=4)
    first, second, *_ = steps()
    p1 = engine.prepare(first)
    with pytest.raises(StepRejected):
        engine.prepare(StepInput(9, add=[NewRequest(0, "dup", PARAMS[0])]))
    p2 = engine.prepare(second)
    assert len(engine.execute(p1).tokens) == 2 and len(engine.execute(p2).tokens) == 2


def test_steps_prepared_before_a_reset_revalidate_against_the_new_state() -> None:
    engine = engine_for(hf_model("llama"), max_rows=4)
    first, second, *_ = steps()
    p1, p2 = engine.prepare(first), engine.prepare(second)
    engine.reset()
    with pytest.raises(StepRejected, match="not active"):
        engine.execute(p2)  # its rows are gone
    assert engine.rows == {}
    assert len(engine.execute(p1).tokens) == 2  # still valid on an empty engine
