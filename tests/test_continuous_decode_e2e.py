"""`radixserve serve --num-continuous-decode-steps 4` with the real model, through the `openai`
client: streamed answers (several tokens per message) join to the unstreamed ones, max_tokens and
stop strings end exactly where they would one token per step, and, under
--enable-deterministic-inference, requests decoding together answer as each does alone."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.procs import serving

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Name three rivers in Africa.",
    "Write a short poem about a lighthouse keeper.",
    "How do bees make honey?",
    "What should I pack for a weekend of hiking?",
    "Explain what a prime number is to a child.",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path
) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("continuous") / "serve.log"
    flags = ["--num-continuous-decode-steps", "4", "--enable-deterministic-inference"]
    with serving(log, flags) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, question: str, **kw: object) -> tuple[str, str, int]:
    """(content, finish_reason, completion_tokens) of a greedy chat answer."""
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        **kw,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert reply.usage is not None
    return choice.message.content or "", choice.finish_reason, reply.usage.completion_tokens


def streamed(client: openai.OpenAI, question: str) -> tuple[str, str | None, int]:
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, tokens = "", None, 0
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish, tokens


def test_answers_streamed_batched_and_stopped_as_one_token_per_step(client: openai.OpenAI) -> None:
    alone = [ask(client, q) for q in QUESTIONS]
    for text, finish, tokens in alone:
        assert text and (finish, tokens) in {("length", MAX_TOKENS)} | {
            ("stop", n) for n in range(1, MAX_TOKENS)
        }
    # Streamed: several tokens per message, the same text and counts.
    assert [streamed(client, q) for q in QUESTIONS] == alone
    # Together: multi-iteration steps over all of them, each answer as alone.
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(client, q), QUESTIONS))
    assert together == alone
    # A stop string in the middle of a multi-iteration step ends the answer right before it.
    text = next(t for t, _, n in alone if n == MAX_TOKENS and len(t.split()) > 8)
    question = QUESTIONS[[a[0] for a in alone].index(text)]
    word = text.split()[len(text.split()) // 2]
    cut, finish, _ = ask(client, question, stop=[word])
    assert finish == "stop" and cut == text[: text.index(word)]
