"""The workloads: random prompts, groups sharing a system prompt, and growing conversations.

Every prompt is text decoded from random token ids of the model's vocabulary, re-encoded and
trimmed until it has the requested number of tokens (exactly, in practice: see `random_text`).
"""

from __future__ import annotations

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


DATASETS: dict[str, Callable[[BenchConfig, TokenCounter, random.Random], Workload]] = {
    "random": _random,
    "generated-shared-prefix": _shared_prefix,
    "multi-turn": _multi_turn,
}


def build_workload(config: BenchConfig, counter: TokenCounter) -> Workload:
    return DATASETS[config.dataset](config, counter, random.Random(config.seed))


def num_requests(workload: Workload) -> int:
    return sum(len(u.user_turns) if isinstance(u, Conversation) else 1 for u in workload)
