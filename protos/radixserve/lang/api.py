"""The expressions programs use: gen, select and the role blocks (SGLang's names)."""

from __future__ import annotations

import json
from typing import Any

from radixserve.lang.ir import Expr, Gen, RoleBegin, RoleEnd, SamplingParams, Select, Seq, to_expr


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    *,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    regex: str | None = None,
    json_schema: dict[str, Any] | str | None = None,
    seed: int | None = None,
    choices: list[str] | None = None,
    max_new_tokens: int | None = None,
) -> Expr:
    """Generates text after the state's text and captures it as `name` (`s[name]`).

    `max_tokens` (or SGLang's `max_new_tokens`) caps the new tokens; `stop` strings and
    `stop_token_ids` end it early; `regex` or `json_schema` (a dict, or a JSON string)
    constrain it; `seed` seeds sampling. Unset options take run()'s, then the server's
    defaults. With `choices`, this is `select(name, choices)`. Raises ValueError for
    contradictory arguments; the server checks the values (a ServerError when it refuses them).
    """
    if choices is not None:
        return select(name, choices, temperature if temperature is not None else 0.0)
    if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
        raise ValueError("set max_tokens or max_new_tokens, not both")
    if json_schema is not None and not isinstance(json_schema, str):
        json_schema = json.dumps(json_schema)
    params = SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else max_new_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        regex=regex,
        json_schema=json_schema,
        seed=seed,
    )
    return Gen(name, params)


def select(
    name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0
) -> Expr:
    """Appends the choice with the highest mean logprob of its tokens after the state's text
    (SGLang's token_length_normalized) and captures it as `name`. With temperature > 0 the choice
    is drawn from the softmax of those scores over temperature. `get_meta_info(name)` gives the
    scores: `normalized_prompt_logprobs` (one per choice, in nats per token),
    `input_token_logprobs` (each choice's [logprob, token_id, text] entries), `cached_tokens`."""
    if not choices:
        raise ValueError("select needs a non-empty list of choices")
    return Select(name, list(choices), temperature)


def system(expr: Expr | str | None = None) -> Expr:
    """A system block around `expr` (text, gen and select calls)."""
    return _role("system", expr)


def user(expr: Expr | str | None = None) -> Expr:
    """A user block around `expr`."""
    return _role("user", expr)


def assistant(expr: Expr | str | None = None) -> Expr:
    """An assistant block around `expr` (`assistant(gen("answer"))` generates the answer)."""
    return _role("assistant", expr)


def _role(role: str, expr: Expr | str | None) -> Expr:
    inner = [to_expr(expr)] if expr is not None else []
    return Seq([RoleBegin(role), *inner, RoleEnd(role)])
