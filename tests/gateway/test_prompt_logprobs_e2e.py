"""Loglikelihood requests as lm-evaluation-harness sends them, through the real services, against
Hugging Face's log_softmax of the same tokens (float32)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gateway.conftest import Stack

pytestmark = pytest.mark.slow
CONTEXT = "The capital of France is"
CONTINUATION = " Paris, a city on the Seine."


@pytest.fixture(scope="module")
def reference(default_model_dir: Path) -> tuple[list[int], int, list[float], list[int]]:
    """(context + continuation ids, context length, HF logprob of every token after the first,
    HF's most likely token at each of those positions)."""
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    context = tok(CONTEXT)["input_ids"]
    ids = context + tok(CONTINUATION)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    values = logp[:-1].gather(1, targets[:, None])[:, 0].tolist()
    return ids, len(context), values, logp[:-1].argmax(-1).tolist()


def harness_request(stack: Stack, ids: list[int], max_tokens: int) -> dict:
    """lm-evaluation-harness's local-completions loglikelihood request (one prompt)."""
    body = {
        "model": stack.model,
        "prompt": [ids],
        "temperature": 0,
        "max_tokens": max_tokens,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    response = httpx.post(
        f"{stack.base_url}/v1/completions", json=body, headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_loglikelihood_matches_hugging_face_with_and_without_a_cache_hit(
    stack: Stack, reference: tuple[list[int], int, list[float], list[int]], max_tokens: int
) -> None:
    ids, ctxlen, expected, greedy = reference
    for attempt in ("cold or warm", "warm: the prompt is cached now"):
        answer = harness_request(stack, ids, max_tokens)
        (choice,) = answer["choices"]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens, attempt
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = lp["token_logprobs"][1 : len(ids)]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4, attempt
        # What the harness computes: the continuation's loglikelihood and whether it is greedy.
        end = len(ids)
        continuation = lp["token_logprobs"][ctxlen:end]
        assert abs(sum(continuation) - sum(expected[ctxlen - 1 :])) < 1e-3
        tops = lp["top_logprobs"][ctxlen:end]
        is_greedy = all(t == max(top.values()) for t, top in zip(continuation, tops, strict=True))
        assert is_greedy == (greedy[ctxlen - 1 :] == ids[ctxlen:])
        assert "".join(lp["tokens"][: len(ids)]) == CONTEXT + CONTINUATION
        usage = answer["usage"]
        assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == max_tokens
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # positions recomputed
    if max_tokens == 0:
        assert choice["text"] == CONTEXT + CONTINUATION  # the prompt alone


def test_generate_returns_sglang_logprobs_from_logprob_start_len(
    stack: Stack, reference: tuple[list[int], int, list[float], list[int]]
) -> None:
    ids, ctxlen, expected, _ = reference
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0},
        "return_logprob": True,
        "logprob_start_len": ctxlen,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    for attempt in range(2):
        response = httpx.post(f"{stack.base_url}/generate", json=body, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        info = response.json()["meta_info"]
        listed = info["input_token_logprobs"]
        assert [entry[1] for entry in listed] == ids[ctxlen:]
        got = [entry[0] for entry in listed]
        assert max(abs(a - b) for a, b in zip(got, expected[ctxlen - 1 :], strict=True)) < 1e-4
        assert "".join(entry[2] for entry in listed) == CONTINUATION
        assert all(len(top) == 2 for top in info["input_top_logprobs"])
        assert len(info["output_token_logprobs"]) == 3 == len(info["output_top_logprobs"])
        if attempt == 1:  # the prompt is cached now: everything before the listed part is reused
            assert info["cached_tokens"] == ctxlen - 1


def test_generate_with_no_new_tokens_scores_the_prompt_alone(
    stack: Stack, reference: tuple[list[int], int, list[float], list[int]]
) -> None:
    """SGLang's `max_new_tokens: 0`: the prompt's logprobs, no text, no output ids."""
    ids, ctxlen, expected, _ = reference
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": ctxlen,
    }
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    response = httpx.post(f"{stack.base_url}/generate", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["text"], answer["output_ids"]) == ("", [])
    info = answer["meta_info"]
    assert info["completion_tokens"] == 0 and info["output_token_logprobs"] == []
    got = [entry[0] for entry in info["input_token_logprobs"]]
    assert max(abs(a - b) for a, b in zip(got, expected[ctxlen - 1 :], strict=True)) < 1e-4
