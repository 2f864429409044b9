from __future__ import annotations

import itertools
import random
from collections import defaultdict

from hypothesis import given
from hypothesis import strategies as st

from services.bench.config import BenchConfig
from services.bench.datasets import (
    Conversation,
    Request,
    Workload,
    build_workload,
    draw_len,
    multi_turn_conversations,
    num_requests,
    random_requests,
    random_text,
    shared_prefix_requests,
)
from services.bench.tokens import Message, TokenCounter


@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**32))
def test_draw_len_is_within_the_range(length: int, ratio: float, seed: int) -> None:
    drawn = draw_len(random.Random(seed), length, ratio)
    assert max(1, int(length * ratio)) <= drawn <= length


def test_random_text_has_the_requested_token_count(counter: TokenCounter) -> None:
    rng = random.Random(0)
    for n in (1, 7, 64, 300):
        assert counter.count_text(random_text(counter, rng, n)) == n


def test_random_lengths_are_drawn_in_range(counter: TokenCounter) -> None:
    requests = list(random_requests(counter, random.Random(3), 40, 120, 50, 0.5))
    input_lens = [counter.count_text(r.prompt()) for r in requests]
    assert all(60 <= n <= 120 for n in input_lens)
    assert all(25 <= r.output_len <= 50 for r in requests)
    assert len(set(input_lens)) > 10 and len({r.output_len for r in requests}) > 10
    assert all(len(r.messages) == 1 and r.messages[0].role == "user" for r in requests)


def test_random_with_ratio_one_is_exact(counter: TokenCounter) -> None:
    requests = list(random_requests(counter, random.Random(4), 10, 80, 16, 1.0))
    assert {counter.count_text(r.prompt()) for r in requests} == {80}
    assert {r.output_len for r in requests} == {16}


def test_shared_prefix_groups_share_their_system_prompt(counter: TokenCounter) -> None:
    requests = list(shared_prefix_requests(counter, random.Random(5), 3, 4, 64, 16, 8))
    by_group: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        by_group[r.group_id].append(r)
    assert sorted(by_group) == [0, 1, 2] and all(len(g) == 4 for g in by_group.values())
    systems = {g: {r.messages[0] for r in rs} for g, rs in by_group.items()}
    assert all(len(s) == 1 for s in systems.values()), "one system prompt per group"
    assert len({next(iter(s)).content for s in systems.values()}) == 3, "groups differ"
    questions = [r.messages[1] for r in requests]
    assert len({q.content for q in questions}) == len(requests)
    assert all(q.role == "user" for q in questions)
    assert {counter.count_text(next(iter(s)).content) for s in systems.values()} == {64}
    assert {counter.count_text(q.content) for q in questions} == {16}
    assert {r.output_len for r in requests} == {8}


def test_shared_prefix_workload_interleaves_groups(counter: TokenCounter) -> None:
    config = BenchConfig(
        dataset="generated-shared-prefix",
        gsp_num_groups=4,
        gsp_prompts_per_group=4,
        gsp_system_prompt_len=8,
        gsp_question_len=4,
    )
    workload = build_workload(config, counter)
    groups = [r.group_id for r in workload]
    assert sorted(groups) == sorted([0, 1, 2, 3] * 4)
    assert groups != sorted(groups)


def test_multi_turn_grows_with_each_answer(counter: TokenCounter) -> None:
    (conversation,) = multi_turn_conversations(counter, random.Random(6), 1, 3, 20, 12)
    answers = ["first answer", "second answer"]
    turns = [conversation.request(t, answers[:t]) for t in range(3)]
    assert [len(r.messages) for r in turns] == [1, 3, 5]
    for earlier, later in itertools.pairwise(turns):
        assert later.messages[: len(earlier.messages)] == earlier.messages
    assert turns[2].messages[1] == Message("assistant", "first answer")
    assert turns[2].messages[3] == Message("assistant", "second answer")
    assert [r.turn for r in turns] == [0, 1, 2]
    assert {counter.count_text(m.content) for m in turns[2].messages if m.role == "user"} == {20}
    sizes = [counter.count_messages(r.messages) for r in turns]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


def test_workloads_are_seeded(counter: TokenCounter) -> None:
    config = BenchConfig(
        dataset="multi-turn", mt_num_conversations=3, mt_turns=2, mt_turn_input_len=10
    )
    first, again = build_workload(config, counter), build_workload(config, counter)
    assert first == again and all(isinstance(c, Conversation) for c in first)
    assert num_requests(first) == 6
    other = build_workload(BenchConfig(**{**config.__dict__, "seed": 2}), counter)
    assert other != first


def test_a_seeds_first_random_prompts_do_not_depend_on_num_prompts(
    counter: TokenCounter,
) -> None:
    """As `--seed`'s help says for `--dataset random`: a run of 24 starts with a run of 8's
    prompts (output lengths included), so runs against a server that stays up need new seeds."""

    def workload(num_prompts: int, seed: int = 7) -> Workload:
        config = BenchConfig(
            num_prompts=num_prompts, random_input_len=40, random_output_len=8, seed=seed
        )
        return build_workload(config, counter)

    short, long = workload(8), workload(24)
    assert len(long) == 24 and long[:8] == short
    assert not {r.prompt() for r in workload(8, seed=8)} & {r.prompt() for r in long}


def test_json_schema_requests_split_by_ratio_and_carry_valid_schemas() -> None:
    import json

    import jsonschema

    from services.bench.client import BenchClient, ClientConfig
    from services.bench.datasets import MIN_RECORDS, json_schema_requests

    requests = list(json_schema_requests(random.Random(5), 40, 64, 0.25))
    constrained = [r for r in requests if r.response_format]
    assert len(requests) == 40 and len(constrained) == 10
    schemas = set()
    for r in requests:
        assert r.output_len == 64 and r.prompt().startswith("Generate example records")
        schema = json.loads(r.prompt().split("\n", 1)[1])
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["records"]["minItems"] == MIN_RECORDS
        schemas.add(json.dumps(schema))
        if r.response_format:
            fmt = json.loads(r.response_format)
            assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == schema
            client = BenchClient(ClientConfig("http://x", "m", "chat"), None, None)  # type: ignore[arg-type]
            assert client.body(r)["response_format"] == fmt
    assert len(schemas) > 20  # schemas vary, so the grammar cache is exercised too
    assert not any(r.response_format for r in json_schema_requests(random.Random(5), 8, 8, 0.0))
