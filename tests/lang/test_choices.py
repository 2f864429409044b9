"""select's boundary and scoring logic, against a scripted scorer (no server)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from radixserve.lang.choices import choice_start, choose, common_prefix_len, mean_logprob, pick


def test_a_token_merged_across_the_boundary_is_scored_as_the_choices() -> None:
    # "Answer:" + " yes" may end the prefix with a different token: scoring starts where the
    # ids of prefix + choice leave the prefix's ids.
    assert common_prefix_len([5, 6, 7], [5, 6, 9, 10]) == 2
    assert choice_start([5, 6, 7], [5, 6, 9, 10], "x") == 2
    assert choice_start([5, 6], [5, 6, 3], "x") == 2
    with pytest.raises(ValueError, match="adds no token"):
        choice_start([5, 6], [5, 6], "")


def test_mean_leaves_out_the_null_logprob_of_a_first_token() -> None:
    assert mean_logprob([[None, 1, None], [-1.0, 2, None], [-3.0, 3, None]]) == -2.0
    assert mean_logprob([[0.0, 1, None], [-2.0, 2, None]]) == -1.0
    assert mean_logprob([]) == -math.inf


def test_pick_is_greedy_at_temperature_zero_and_samples_above() -> None:
    assert pick([-2.0, -0.5, -0.5], 0.0) == 1  # the first of equals
    rng = random.Random(0)
    draws = [pick([-0.1, -5.0], 1.0, rng) for _ in range(200)]
    assert 150 < draws.count(0) < 200 and draws.count(1) > 0


class Scripted:
    """Character ids; each choice's token logprob is -1 per character of the choice, except
    that "b" costs -0.1."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        return [[ord(c) for c in p] for p in prompts]

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        self.bodies.append(body)
        ids = body["input_ids"][body["logprob_start_len"] :]
        entries = [[-0.1 if i == ord("b") else -1.0, i, None] for i in ids]
        info = {"input_token_logprobs": entries, "output_token_logprobs": [[-0.5, 0, None]]}
        return {"text": "", "meta_info": {**info, "prompt_tokens": 9, "cached_tokens": 3}}


def test_choose_scores_each_choice_from_its_boundary_and_records_the_scores() -> None:
    scorer = Scripted()
    decision = choose(scorer, "Q:", ["aa", "ab", "bbbb"], 0.0)
    assert decision.choice == "bbbb"
    scores = decision.meta_info["normalized_prompt_logprobs"]
    assert scores == pytest.approx([-1.0, -0.55, -0.1])
    assert [len(e) for e in decision.meta_info["input_token_logprobs"]] == [2, 2, 4]
    assert decision.meta_info["cached_tokens"] == [3, 3, 3]
    starts = sorted(b["logprob_start_len"] for b in scorer.bodies)
    assert starts == [2, 2, 2]
    assert all(b["sampling_params"]["max_new_tokens"] == 0 for b in scorer.bodies)
