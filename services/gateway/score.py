"""SGLang's `POST /v1/score`: how likely each label token is to follow a query and an item.

For each item, the prompt is the query then the item (the item first with `item_first`): text is
joined, then tokenized; token ids are concatenated. The score of label token t is the probability
the model gives t as the prompt's next token — the prompt logprob of t at the end of `prompt + [t]`,
one generation per label, whose shared prompt the engine's prefix cache computes once. With
`apply_softmax`, each item's scores are renormalized over its labels (a softmax of their
logprobs, which equals the softmax of their logits). Answer: `{"object": "scoring", "scores":
[[score per label] per item], "model", "usage"}`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, Field, StrictBool

from services.gateway.errors import InvalidRequest
from services.gateway.fields import FieldTable, Rule
from services.gateway.limits import TokenId
from services.gateway.protocol import NonEmptyText, PromptIds
from services.gateway.sampling import (
    GenerationInput,
    ModelInfo,
    SamplingParams,
    TextOptions,
    check_prompt_chars,
    check_token_ids,
    fit_context,
)

MAX_SCORED = 1024  # items x labels of one request (one generation each)


class ScoreRequest(BaseModel):
    model: str | None = None
    query: NonEmptyText | PromptIds
    items: (
        NonEmptyText
        | Annotated[list[NonEmptyText], Field(min_length=1)]
        | Annotated[list[PromptIds], Field(min_length=1)]
    )
    label_token_ids: Annotated[list[TokenId], Field(min_length=1)]
    apply_softmax: StrictBool = False
    item_first: StrictBool = False

    def item_list(self) -> list[str] | list[list[int]]:
        return [self.items] if isinstance(self.items, str) else self.items  # type: ignore[return-value]


SCORE = FieldTable(
    "/v1/score",
    honoured={
        "model": Rule("must name the served model"),
        "query": Rule("text or token ids before each item"),
        "items": Rule("text(s) or token id lists, each scored after the query"),
        "label_token_ids": Rule("the tokens whose next-token probability is returned"),
        "apply_softmax": Rule("renormalize each item's scores over the labels"),
        "item_first": Rule("the item before the query"),
    },
    no_effect={},
    rejected={},
)


def check_request(req: ScoreRequest, model: ModelInfo) -> None:
    """InvalidRequest for mixed text and ids, ids past the vocabulary, or too many scores."""
    items = req.item_list()
    text_query = isinstance(req.query, str)
    if any(isinstance(item, str) != text_query for item in items):
        raise InvalidRequest(
            "'query' and 'items' must both be text or both token ids", param="items"
        )
    check_token_ids(req.label_token_ids, model, "label_token_ids")
    if not text_query:
        check_token_ids(req.query, model, "query")  # type: ignore[arg-type]
        for item in items:
            check_token_ids(item, model, "items")  # type: ignore[arg-type]
    else:
        check_prompt_chars([req.query, *items], model, "items")  # type: ignore[list-item]
    scored = len(items) * len(req.label_token_ids)
    if scored > MAX_SCORED:
        raise InvalidRequest(
            f"{len(items)} items x {len(req.label_token_ids)} labels is more than {MAX_SCORED} "
            "scores per request",
            param="items",
        )


def joined_texts(req: ScoreRequest) -> list[str]:
    """Each item's prompt as text (text requests)."""
    query = str(req.query)
    return [f"{item}{query}" if req.item_first else f"{query}{item}" for item in req.item_list()]  # type: ignore[str-bytes-safe]


def joined_ids(req: ScoreRequest) -> list[list[int]]:
    """Each item's prompt as ids (token id requests)."""
    query = list(req.query)  # type: ignore[arg-type]
    return [[*item, *query] if req.item_first else [*query, *item] for item in req.item_list()]  # type: ignore[misc]


def generation_inputs(
    request_id: str, prompts: list[list[int]], labels: list[int], model: ModelInfo
) -> list[GenerationInput]:
    """One generation per (prompt, label): the prompt with the label appended, asking for the
    label's prompt logprob; its one generated token is not shown."""
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    inputs = []
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            ids = [*prompt, label]
            sampling = fit_context(greedy, len(ids), model, "items")
            inputs.append(
                GenerationInput(
                    f"{request_id}-{i}-{j}",
                    ids,
                    sampling,
                    TextOptions(),
                    logprob_start_len=len(prompt),
                    hide_output=True,
                )
            )
    return inputs


def scores_of(logprobs: list[float], num_labels: int, apply_softmax: bool) -> list[list[float]]:
    """The label logprobs (item-major) as scores: probabilities, or a softmax per item."""
    rows = [logprobs[i : i + num_labels] for i in range(0, len(logprobs), num_labels)]
    if not apply_softmax:
        return [[math.exp(v) for v in row] for row in rows]
    out = []
    for row in rows:
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        total = sum(weights)
        out.append([w / total for w in weights])
    return out


def score_body(model: str, scores: list[list[float]], prompt_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    return {"object": "scoring", "model": model, "scores": scores, "usage": usage}
