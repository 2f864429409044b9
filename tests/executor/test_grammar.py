"""Grammar-constrained sampling in the engine, on a tiny random model with a byte vocabulary.

Token i < 255 is the byte i and 255 is EOS, so the output's text is its bytes. A random model
never writes valid JSON by itself: every valid answer here is the grammar's doing.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from services.common.grammar import GrammarSpec
from services.executor.engine import Engine
from services.executor.sampling_params import SamplingParams
from services.executor.step import NewRequest, Slice, SlotWrite, StepInput
from services.executor.validation import StepRejected
from tests.executor.grammar_vocab import EOS, grammar_engine, text

MAX_NEW = 40
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["alpha", "beta"]},
    },
    "required": ["ok", "n", "tag"],
}
REGEX = r"(yes|no)-[0-9]{2,3}"


class Runner:
    """Drives rows through prefill and decode until each ends (grammar) or reaches MAX_NEW."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.step_id, self.next_slot = engine, 0, 1
        self.outputs: dict[int, list[int]] = {}
        self.ended: set[int] = set()

    def run(
        self,
        rows: dict[int, tuple[list[int], SamplingParams, GrammarSpec | None]],
        output_ids: dict[int, list[int]] | None = None,
    ) -> dict[int, list[int]]:
        known = output_ids or {}
        adds, writes, slices = [], [], []
        for row, (prompt, params, grammar) in rows.items():
            before = known.get(row, [])
            seq = prompt + before
            adds.append(NewRequest(row, f"r{row}", params, [], list(before), grammar))
            slots = list(range(self.next_slot, self.next_slot + len(seq) + MAX_NEW))
            self.next_slot += len(slots)
            writes.append(SlotWrite(row, 0, slots))
            slices.append(Slice(row, 0, seq))
            self.outputs[row] = list(before)
        out = self._step(add=adds, writes=writes, slices=slices)
        while True:
            live = [r for r in rows if r not in self.ended and len(self.outputs[r]) < MAX_NEW]
            if not live:
                break
            decode = []
            for r in live:
                pos = len(rows[r][0]) + len(self.outputs[r]) - 1
                decode.append(Slice(r, pos, [], use_last_sampled=True))
            out = self._step(slices=decode)
        self._step(release_rows=list(rows))
        del out
        return {r: self.outputs[r] for r in rows}

    def _step(self, **kw: object):
        self.step_id += 1
        out = self.engine.run_step(StepInput(self.step_id, **kw))  # type: ignore[arg-type]
        for i, t in enumerate(out.tokens):
            self.outputs[t.row].append(t.token_id)
            if i in out.grammar_ended:
                self.ended.add(t.row)
        return out


PROMPTS = [[10, 20, 30, 40], [5, 6, 7], [100, 3, 200, 9, 1], [77, 78]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_rows_follow_their_grammars_and_end(temperature: float) -> None:
    engine = grammar_engine()
    greedy = SamplingParams(temperature=temperature, seed=3)
    rows = {
        0: (PROMPTS[0], greedy, GrammarSpec.json_schema(SCHEMA)),
        1: (PROMPTS[1], greedy, GrammarSpec("regex", REGEX)),
        2: (PROMPTS[2], greedy, GrammarSpec.choice(['say "hi"', "say bye"])),
        3: (PROMPTS[3], greedy, GrammarSpec("json_object")),
    }
    runner = Runner(engine)
    out = runner.run(rows)
    value = json.loads(text(out[0]))
    assert set(value) == {"ok", "n", "tag"} and value["tag"] in ("alpha", "beta")
    assert 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
    assert re.fullmatch(REGEX, text(out[1]))
    assert text(out[2]) in ('say "hi"', "say bye")
    for row in (0, 1, 2):
        assert row in runner.ended and out[row][-1] == EOS  # ended by the grammar, on EOS
    if 3 in runner.ended:
        assert isinstance(json.loads(text(out[3])), dict)
    else:  # a random model may keep an object open to MAX_NEW; what it wrote is a prefix
        assert text(out[3]).startswith("{")


def test_free_rows_are_untouched_by_constrained_rows_in_the_same_batch() -> None:
    greedy = SamplingParams(temperature=0.0)
    free = {0: (PROMPTS[0], greedy, None), 1: (PROMPTS[1], greedy, None)}
    alone = Runner(grammar_engine()).run({**free, 2: (PROMPTS[2], greedy, None)})
    mixed = Runner(grammar_engine()).run(
        {**free, 2: (PROMPTS[2], greedy, GrammarSpec("regex", REGEX))}
    )
    assert mixed[0] == alone[0] and mixed[1] == alone[1]
    assert mixed[2] != alone[2] and re.fullmatch(REGEX, text(mixed[2]))


def test_a_returning_request_continues_its_grammar_from_its_output() -> None:
    """A retracted request is re-added with the tokens it generated: the matcher replays them
    and the rest of the answer is what the uninterrupted run gave."""
    greedy = SamplingParams(temperature=0.0)
    spec = GrammarSpec.json_schema(SCHEMA)
    whole = Runner(grammar_engine()).run({0: (PROMPTS[0], greedy, spec)})[0]
    cut = len(whole) // 2
    resumed = Runner(grammar_engine()).run(
        {3: (PROMPTS[0], greedy, spec)}, output_ids={3: whole[:cut]}
    )[3]
    assert resumed == whole


def test_output_that_breaks_the_grammar_rejects_the_step_and_changes_nothing() -> None:
    engine = grammar_engine()
    bad = NewRequest(
        0, "r0", SamplingParams(temperature=0.0), [], [ord("x")], GrammarSpec("regex", "[0-9]+")
    )
    with pytest.raises(StepRejected, match="does not follow the grammar"):
        engine.run_step(
            StepInput(
                1, add=[bad], writes=[SlotWrite(0, 0, [1, 2, 3])], slices=[Slice(0, 0, [1, 2])]
            )
        )
    assert not engine.rows


def test_an_invalid_grammar_rejects_the_step_with_the_reason() -> None:
    engine = grammar_engine()
    req = NewRequest(0, "r0", SamplingParams(temperature=0.0), [], [], GrammarSpec("regex", "a(b"))
    with pytest.raises(StepRejected, match="parenthesis is not closed"):
        engine.run_step(
            StepInput(1, add=[req], writes=[SlotWrite(0, 0, [1, 2])], slices=[Slice(0, 0, [1])])
        )
    assert not engine.rows


def test_chunked_prefill_samples_under_the_grammar_only_at_the_last_chunk() -> None:
    engine = grammar_engine()
    spec = GrammarSpec("regex", "[a-c]{3}")
    greedy = SamplingParams(temperature=0.0)
    prompt = list(range(1, 13))
    add = NewRequest(0, "r0", greedy, [], [], spec)
    step = StepInput(1, add=[add], writes=[SlotWrite(0, 0, list(range(1, 20)))])
    step.slices = [Slice(0, 0, prompt[:6], sample=False)]
    assert engine.run_step(step).tokens == []
    out = engine.run_step(StepInput(2, slices=[Slice(0, 6, prompt[6:])]))
    tokens = [out.tokens[0].token_id]
    for i in range(3):
        out = engine.run_step(
            StepInput(3 + i, slices=[Slice(0, 12 + i, [], use_last_sampled=True)])
        )
        tokens.append(out.tokens[0].token_id)
    assert text(tokens[:3]) in {a + b + c for a in "abc" for b in "abc" for c in "abc"}
    assert tokens[3] == EOS and out.grammar_ended == [0]


def test_logprobs_are_over_the_allowed_tokens() -> None:
    engine = grammar_engine()
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)
    add = NewRequest(0, "r0", params, [], [], GrammarSpec.choice(["a", "b"]))
    out = engine.run_step(
        StepInput(1, add=[add], writes=[SlotWrite(0, 0, [1, 2, 3])], slices=[Slice(0, 0, [7, 8])])
    )
    token = out.tokens[0]
    allowed = [
        t for t, lp in zip(token.top_ids, token.top_logprobs, strict=True) if lp > float("-inf")
    ]
    assert set(allowed) == {ord("a"), ord("b")}
    assert sum(torch.tensor(token.top_logprobs[:2]).exp().tolist()) == pytest.approx(1.0, abs=1e-5)


def test_a_structural_tag_constrains_the_tagged_content() -> None:
    """xgrammar's structural tag, as `response_format: {"type": "structural_tag", ...}` sends it."""
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<answer>",
            "content": {"type": "regex", "pattern": REGEX},
            "end": "</answer>",
        },
    }
    greedy = SamplingParams(temperature=0.0)
    out = Runner(grammar_engine()).run(
        {0: (PROMPTS[0], greedy, GrammarSpec("structural_tag", json.dumps(tag)))}
    )[0]
    assert re.fullmatch(f"<answer>{REGEX}</answer>", text(out)), text(out)
