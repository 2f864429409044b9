"""`select`: score each choice by the mean logprob of its tokens after the text so far (SGLang's
`token_length_normalized`) and pick the best.

Tokens can merge across the boundary between the text and a choice, so a choice's tokens are
those of `prefix + choice` from the first position where its ids leave the prefix's ids. Each
choice is one /generate over those ids with `return_logprob` and `logprob_start_len` at that
position and `max_new_tokens: 0` (the prompt alone, no text generated). The choices are sent concurrently; the prefix before `logprob_start_len` comes from the prefix
cache after the first of them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


class Scorer(Protocol):
    def tokenize(self, prompts: list[str]) -> list[list[int]]: ...
    def generate(self, body: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Decision:
    """The chosen text and what select records as its meta info."""

    choice: str
    meta_info: dict[str, Any]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choice_start(prefix_ids: Sequence[int], ids: Sequence[int], choice: str) -> int:
    """The first position of `ids` (prefix + choice) that is not the prefix's; ValueError when
    the choice adds no token."""
    start = common_prefix_len(prefix_ids, ids)
    if start >= len(ids):
        raise ValueError(f"select: choice {choice!r} adds no token to the text")
    return start


def mean_logprob(entries: list[list[Any]]) -> float:
    """The mean of SGLang logprob entries ([logprob, token_id, text]); a null logprob (the
    prompt's first token has none) is left out."""
    values = [e[0] for e in entries if e[0] is not None]
    return sum(values) / len(values) if values else -math.inf


def pick(scores: list[float], temperature: float, rng: random.Random | None = None) -> int:
    """The index of the best score (the first of equals); with temperature > 0, an index drawn
    from softmax(scores / temperature)."""
    if temperature <= 0:
        return max(range(len(scores)), key=scores.__getitem__)
    top = max(scores)
    weights = [math.exp((s - top) / temperature) for s in scores]
    return (rng or random).choices(range(len(scores)), weights)[0]


def choose(scorer: Scorer, prefix: str, choices: list[str], temperature: float) -> Decision:
    """Scores every choice after `prefix` on the server and picks one."""
    if not choices:
        raise ValueError("select needs at least one choice")
    prefix_ids, *choice_ids = scorer.tokenize([prefix, *(prefix + c for c in choices)])
    starts = [choice_start(prefix_ids, ids, c) for ids, c in zip(choice_ids, choices, strict=True)]
    bodies = [_body(ids, start) for ids, start in zip(choice_ids, starts, strict=True)]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        infos = [out["meta_info"] for out in pool.map(scorer.generate, bodies)]
    token_logprobs = [info["input_token_logprobs"] for info in infos]
    scores = [mean_logprob(entries) for entries in token_logprobs]
    meta = {
        "normalized_prompt_logprobs": scores,
        "input_token_logprobs": token_logprobs,
        "output_token_logprobs": [info["output_token_logprobs"] for info in infos],
        "prompt_tokens": [info.get("prompt_tokens") for info in infos],
        "cached_tokens": [info.get("cached_tokens") for info in infos],
    }
    return Decision(choices[pick(scores, temperature)], meta)


def _body(ids: list[int], start: int) -> dict[str, Any]:
    return {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0},  # the prompt alone: its logprobs
        "return_logprob": True,
        "logprob_start_len": start,
        "return_text_in_logprobs": True,
    }
