"""`radixserve serve --enable-deterministic-inference` in the default dtype (bfloat16 on a CPU
with AVX-512 BF16 or with AVX2 and no AVX-512, float32 elsewhere): a seeded chat request at
temperature 1 answers the same — tokens and logprobs — on a cold cache, on a warm one, and when it
runs among other requests whose prefill chunks share its steps (a 32-token chunk budget)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.procs import serving

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Name three rivers in Africa and one fact about each.",
    "Write a short poem about a lighthouse keeper.",
    "How do bees make honey?",
    "What should I pack for a weekend of hiking?",
    "Explain what a prime number is to a child.",
]
BACKGROUND = [
    "Summarize the history of the printing press in a few sentences, please. " * 4,
    "List ten animals that live in the ocean and what they eat.",
    "Tell me a story about a dragon who is afraid of the dark, with a happy ending. " * 3,
    "What are the rules of chess for the knight and the bishop?",
    "Describe a busy market in the morning, its sounds and smells. " * 5,
    "Give me a recipe for pancakes.",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[str]:
    log = tmp_path_factory.mktemp("deterministic") / "serve.log"
    flags = ["--dtype", "auto", "--enable-deterministic-inference"]
    with serving(log, [*flags, "--chunked-prefill-size", "32"]) as url:
        yield url


def ask(client: openai.OpenAI, question: str, seed: int) -> tuple[str, list[float]]:
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        temperature=1.0,
        seed=seed,
        max_tokens=24,
        logprobs=True,
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    return choice.message.content or "", [t.logprob for t in choice.logprobs.content]


def test_seeded_answers_do_not_depend_on_cache_or_batch(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)
    seeds = range(100, 100 + len(QUESTIONS))

    def flush() -> None:
        assert httpx.post(f"{server}/flush_cache", timeout=30).status_code == 200

    flush()
    cold = [ask(client, q, s) for q, s in zip(QUESTIONS, seeds, strict=True)]
    warm = [ask(client, q, s) for q, s in zip(QUESTIONS, seeds, strict=True)]
    flush()
    with ThreadPoolExecutor(len(QUESTIONS) + len(BACKGROUND)) as pool:
        noise = [pool.submit(ask, client, q, i) for i, q in enumerate(BACKGROUND)]
        crowded = list(pool.map(lambda qs: ask(client, *qs), zip(QUESTIONS, seeds, strict=True)))
        assert all(n.result()[0] for n in noise)  # the background ran (and answered) alongside
    assert warm == cold
    assert crowded == cold
