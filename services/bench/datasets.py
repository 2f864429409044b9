"""The workloads: random prompts, groups sharing a system prompt, growing conversations, and
JSON-schema requests (structured outputs).

Every prompt is text decoded from random token ids of the model's vocabulary, re-encoded and
trimmed until it has the requested number of tokens (exactly, in practice: see `random_text`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.bench.tokens import Message, TokenCounter

if TYPE_CHECKING:
    from services.bench.config import BenchConfig


@dataclass(frozen=True)
class Request:
    """One request to send; `messages` is the chat form, `prompt()` the completions form."""

    messages: tuple[Message, ...]
    output_len: int  # max_tokens asked for
    group_id: int = 0  # generated-shared-prefix: requests of a group share their system prompt
    conversation_id: int = 0  # multi-turn: the conversation this turn belongs to
    turn: int = 0
    response_format: str = ""  # json-schema: the `response_format` to send, as JSON ("" = none)

    def prompt(self) -> str:
        return "\n\n".join(m.content for m in self.messages)


@dataclass(frozen=True)
class Conversation:
    """A multi-turn chat: turn t sends every earlier user message, each followed by the answer
    the server gave to it, then user message t. Turns are therefore sequential."""

    conversation_id: int
    user_turns: tuple[str, ...]
    output_len: int

    def request(self, turn: int, answers: Sequence[str]) -> Request:
        assert len(answers) == turn, "turn t needs the answers to turns 0..t-1"
        messages: list[Message] = []
        for user, answer in zip(self.user_turns[:turn], answers, strict=True):
            messages += [Message("user", user), Message("assistant", answer)]
        messages.append(Message("user", self.user_turns[turn]))
        return Request(
            tuple(messages), self.output_len, conversation_id=self.conversation_id, turn=turn
        )


Workload = list[Request] | list[Conversation]


def random_text(counter: TokenCounter, rng: random.Random, num_tokens: int, rounds: int = 8) -> str:
    """Text of `num_tokens` tokens (decoding then re-encoding merges or splits some ids, so the
    ids are trimmed or topped up until the round trip is stable; almost always in 1-2 rounds)."""
    ids = rng.choices(counter.ordinary_ids, k=num_tokens)
    text = counter.decode(ids)
    for _ in range(rounds):
        ids = counter.encode(text)
        if len(ids) == num_tokens:
            break
        if len(ids) > num_tokens:
            ids = ids[:num_tokens]
        else:
            ids += rng.choices(counter.ordinary_ids, k=num_tokens - len(ids))
        text = counter.decode(ids)
    return text


def draw_len(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length uniform in [length * range_ratio, length], at least 1."""
    return rng.randint(max(1, int(length * range_ratio)), length)


def random_requests(
    counter: TokenCounter,
    rng: random.Random,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
) -> Iterator[Request]:
    for _ in range(num_prompts):
        prompt = random_text(counter, rng, draw_len(rng, input_len, range_ratio))
        yield Request((Message("user", prompt),), draw_len(rng, output_len, range_ratio))


def shared_prefix_requests(
    counter: TokenCounter,
    rng: random.Random,
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
) -> Iterator[Request]:
    """Groups in turn (shuffle to interleave them); each group shares one system prompt."""
    for group in range(num_groups):
        system = Message("system", random_text(counter, rng, system_prompt_len))
        for _ in range(prompts_per_group):
            question = Message("user", random_text(counter, rng, question_len))
            yield Request((system, question), output_len, group_id=group)


def multi_turn_conversations(
    counter: TokenCounter,
    rng: random.Random,
    num_conversations: int,
    turns: int,
    turn_input_len: int,
    output_len: int,
) -> Iterator[Conversation]:
    for conversation in range(num_conversations):
        users = tuple(random_text(counter, rng, turn_input_len) for _ in range(turns))
        yield Conversation(conversation, users, output_len)


def _random(config: BenchConfig, counter: TokenCounter, rng: random.Random) -> Workload:
    return list(
        random_requests(
            counter,
            rng,
            config.num_prompts,
            config.random_input_len,
            config.random_output_len,
            config.random_range_ratio,
        )
    )


def _shared_prefix(config: BenchConfig, counter: TokenCounter, rng: random.Random) -> Workload:
    requests = list(
        shared_prefix_requests(
            counter,
            rng,
            config.gsp_num_groups,
            config.gsp_prompts_per_group,
            config.gsp_system_prompt_len,
            config.gsp_question_len,
            config.gsp_output_len,
        )
    )
    rng.shuffle(requests)  # groups interleave, so a prefix cache must keep several alive at once
    return requests


def _multi_turn(config: BenchConfig, counter: TokenCounter, rng: random.Random) -> Workload:
    return list(
        multi_turn_conversations(
            counter,
            rng,
            config.mt_num_conversations,
            config.mt_turns,
            config.mt_turn_input_len,
            config.mt_output_len,
        )
    )


# json-schema: fields a record may have; each request's schema takes a random subset and order.
RECORD_FIELDS: dict[str, dict] = {
    "id": {"type": "integer", "minimum": 1, "maximum": 999999},
    "name": {"type": "string", "minLength": 1, "maxLength": 24},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.com$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "active": {"type": "boolean"},
    "score": {"type": "number", "minimum": 0, "maximum": 100},
    "role": {"enum": ["admin", "editor", "viewer", "guest"]},
    "city": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
}
MIN_RECORDS = 64  # more than any output length reaches: every answer runs to max_tokens


def record_schema(rng: random.Random) -> dict:
    """A JSON schema of a list of at least MIN_RECORDS records with 3-6 of RECORD_FIELDS."""
    names = rng.sample(list(RECORD_FIELDS), rng.randint(3, 6))
    record = {
        "type": "object",
        "properties": {n: RECORD_FIELDS[n] for n in names},
        "required": names,
    }
    return {
        "type": "object",
        "properties": {"records": {"type": "array", "items": record, "minItems": MIN_RECORDS}},
        "required": ["records"],
    }


def json_schema_requests(
    rng: random.Random, num_prompts: int, output_len: int, structured_ratio: float
) -> Iterator[Request]:
    """Requests asking for records following a schema of their own; a share `structured_ratio`
    of them (drawn at random) sends it as `response_format`, the rest ask for the same text free.
    The schemas ask for more records than `output_len` tokens hold, so constrained answers run
    to max_tokens like free ones with ignore_eos: the two kinds are timed on the same lengths."""
    constrained = set(rng.sample(range(num_prompts), round(num_prompts * structured_ratio)))
    for i in range(num_prompts):
        schema = record_schema(rng)
        prompt = (
            "Generate example records as JSON, following this JSON schema exactly:\n"
            + json.dumps(schema)
        )
        fmt = ""
        if i in constrained:
            spec = {"name": f"records_{i}", "schema": schema, "strict": True}
            fmt = json.dumps({"type": "json_schema", "json_schema": spec})
        yield Request((Message("user", prompt),), output_len, response_format=fmt)


def _json_schema(config: BenchConfig, counter: TokenCounter, rng: random.Random) -> Workload:
    return list(
        json_schema_requests(
            rng, config.num_prompts, config.random_output_len, config.structured_output_ratio
        )
    )


DATASETS: dict[str, Callable[[BenchConfig, TokenCounter, random.Random], Workload]] = {
    "random": _random,
    "generated-shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
    "json-schema": _json_schema,
}


def build_workload(config: BenchConfig, counter: TokenCounter) -> Workload:
    return DATASETS[config.dataset](config, counter, random.Random(config.seed))


def num_requests(workload: Workload) -> int:
    return sum(len(u.user_turns) if isinstance(u, Conversation) else 1 for u in workload)
