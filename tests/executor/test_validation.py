"""A bad Step is rejected whole and changes no state; the engine carries on."""

from __future__ import annotations

import copy

import pytest
import torch

from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, SharedPrefix, Slice, SlotWrite, StepInput
from services.executor.validation import StepRejected
from tests.executor.tiny import engine_for, hf_model

G = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def hf():
    return hf_model("llama")


def started(hf):
    engine = engine_for(hf, num_slots=512, max_rows=4)
    engine.run_step(
        StepInput(
            1,
            add=[NewRequest(0, "a", G)],
            writes=[SlotWrite(0, 0, list(range(1, 40)))],
            slices=[Slice(0, 0, [1, 2, 3, 4])],
        )
    )
    return engine


BAD_STEPS = {
    "unknown row slice": StepInput(2, slices=[Slice(3, 0, [1])]),
    "row out of range": StepInput(2, add=[NewRequest(9, "x", G)]),
    "row already active": StepInput(2, add=[NewRequest(0, "x", G)]),
    "slot index out of range": StepInput(2, writes=[SlotWrite(0, 4, [513])]),
    "padding slot written": StepInput(2, writes=[SlotWrite(0, 4, [0])]),
    "slice past context": StepInput(2, slices=[Slice(0, 510, [1, 2, 3])]),
    "write past context": StepInput(2, writes=[SlotWrite(0, 510, [5, 6, 7])]),
    "token out of vocabulary": StepInput(2, slices=[Slice(0, 4, [256])]),
    "release unknown row": StepInput(2, release_rows=[2]),
    "two slices one row": StepInput(2, slices=[Slice(0, 4, [1]), Slice(0, 5, [2])]),
    "empty slice": StepInput(2, slices=[Slice(0, 4, [])]),
    "last sampled on new row": StepInput(
        2, add=[NewRequest(1, "b", G)], slices=[Slice(1, 0, [], True)]
    ),
    "bad temperature": StepInput(2, add=[NewRequest(1, "b", SamplingParams(temperature=-1))]),
    "bad top_p": StepInput(2, add=[NewRequest(1, "b", SamplingParams(top_p=0.0))]),
    "too many top logprobs": StepInput(
        2, add=[NewRequest(1, "b", SamplingParams(top_logprobs=99))]
    ),
    "slice on released row": StepInput(2, release_rows=[0], slices=[Slice(0, 4, [], True)]),
    "shared prefix past the slice start": StepInput(
        2, slices=[Slice(0, 4, [], True)], shared_prefixes=[SharedPrefix(5, [0])]
    ),
    "shared prefix of length 0": StepInput(
        2, slices=[Slice(0, 4, [], True)], shared_prefixes=[SharedPrefix(0, [0])]
    ),
    "shared prefix row without a slice": StepInput(
        2, slices=[Slice(0, 4, [], True)], shared_prefixes=[SharedPrefix(2, [0, 1])]
    ),
    "row in two shared prefixes": StepInput(
        2,
        slices=[Slice(0, 4, [], True)],
        shared_prefixes=[SharedPrefix(2, [0]), SharedPrefix(3, [0])],
    ),
    "shared prefix slots differ": StepInput(
        2,
        add=[NewRequest(1, "b", G)],
        writes=[SlotWrite(1, 0, [1, 2, 9, 4, 50])],
        slices=[Slice(0, 4, [], True), Slice(1, 4, [7])],
        shared_prefixes=[SharedPrefix(4, [0, 1])],
    ),
    "shared prefix over unset slots": StepInput(
        2,
        add=[NewRequest(1, "b", G), NewRequest(2, "c", G)],
        slices=[Slice(1, 2, [5]), Slice(2, 2, [5])],
        shared_prefixes=[SharedPrefix(2, [1, 2])],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_STEPS))
def test_bad_step_is_rejected_without_changing_state(hf, name: str) -> None:
    engine = started(hf)
    rows_before = copy.deepcopy({r: (s.output_ids, s.has_sampled) for r, s in engine.rows.items()})
    table_before = engine.table.table.clone()
    k_before = engine.pool.k[0].clone()
    last_before = engine.last_sampled.clone()
    with pytest.raises(StepRejected):
        engine.run_step(BAD_STEPS[name])
    assert {r: (s.output_ids, s.has_sampled) for r, s in engine.rows.items()} == rows_before
    assert torch.equal(engine.table.table, table_before)
    assert torch.equal(engine.pool.k[0], k_before)
    assert torch.equal(engine.last_sampled, last_before)
    # ... and the request carries on.
    out = engine.run_step(StepInput(3, slices=[Slice(0, 4, [], True)]))
    assert len(out.tokens) == 1
