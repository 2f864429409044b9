"""SGLang's /v1/score: the scores' arithmetic and the request checks (in process), then the
probabilities through the real services against Hugging Face's next-token distribution."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.gateway.errors import InvalidRequest
from services.gateway.score import (
    SCORE,
    ScoreRequest,
    check_request,
    joined_ids,
    joined_texts,
    scores_of,
)
from tests.gateway.conftest import Stack
from tests.gateway.test_fields import MODEL, api_doc_rows, rows_of


def test_scores_are_probabilities_or_a_softmax_over_the_labels() -> None:
    logprobs = [math.log(0.2), math.log(0.05), math.log(0.5), math.log(0.25)]
    plain = scores_of(logprobs, 2, apply_softmax=False)
    assert plain == [pytest.approx([0.2, 0.05]), pytest.approx([0.5, 0.25])]
    soft = scores_of(logprobs, 2, apply_softmax=True)
    assert soft == [pytest.approx([0.8, 0.2]), pytest.approx([2 / 3, 1 / 3])]


def test_items_join_the_query_on_the_side_asked() -> None:
    text = ScoreRequest(query="Q:", items=["a", "b"], label_token_ids=[1])
    assert joined_texts(text) == ["Q:a", "Q:b"]
    ids = ScoreRequest(query=[1, 2], items=[[3]], label_token_ids=[1], item_first=True)
    assert joined_ids(ids) == [[3, 1, 2]]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"query": "q", "items": [[1]], "label_token_ids": [1]}, "items"),
        ({"query": "q", "items": "a", "label_token_ids": [MODEL.vocab_size]}, "label_token_ids"),
        ({"query": [1], "items": [[MODEL.vocab_size]], "label_token_ids": [1]}, "items"),
        ({"query": "q", "items": ["a"] * 600, "label_token_ids": [1, 2]}, "items"),
    ],
)
def test_bad_requests_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request(ScoreRequest.model_validate(body), MODEL)
    assert err.value.param == param


@pytest.mark.slow
def test_scores_match_hugging_faces_next_token_probabilities(
    stack: Stack, default_model_dir: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    query, items = "Is the sky blue? Answer:", [" Yes", " No, it is"]
    labels = [tok(" yes")["input_ids"][0], tok(" no")["input_ids"][0]]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    expected = []
    for item in items:
        ids = tok(query + item)["input_ids"]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        expected.append([float(probs[t]) for t in labels])
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for softmax in (False, True):
        body = {"query": query, "items": items, "label_token_ids": labels, "apply_softmax": softmax}
        response = httpx.post(f"{stack.base_url}/v1/score", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["object"] == "scoring" and answer["model"] == stack.model
        for got, want in zip(answer["scores"], expected, strict=True):
            if softmax:
                want = [w / sum(want) for w in want]
            assert got == pytest.approx(want, abs=1e-4)


def test_api_doc_lists_the_score_fields_as_in_the_code() -> None:
    rows = api_doc_rows("#### `/v1/score` fields")
    assert set(rows) == rows_of(SCORE) and len(rows) == len(set(rows))
