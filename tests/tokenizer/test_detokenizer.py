"""Incremental detokenization: deltas join to the full decode and never split a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.stream import DetokenizeOptions
from services.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, jalapeño, Øresund, Ærøskøbing.",
    "你好，世界！東京は日本の首都です。서울은 한국의 수도입니다.",
    "Emoji: 🎉🚀 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 and ❤️ done",
    "Combining: e\u0301 a\u0308 n\u0303; Arabic: مرحبا بالعالم; Hindi: नमस्ते दुनिया",
    "def f(x):\n\treturn x ** 2  # squares\n\n\n    indented\r\nwindows",
    "   leading and trailing spaces   ",
    "数学 ∑∫∂ ≤ ≥ ≠ ∞ — “quotes” ‘single’ … €100 ¥200 £300",
    "🦀" * 5 + "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 𐍈",
]


def byte_decode(ids: list[int]) -> str:
    """A byte tokenizer: every id is one UTF-8 byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream_text(tok: Tokenizer, chunks: list[list[int]], **options: object) -> list[str]:
    stream = tok.new_detokenizer(DetokenizeOptions(**options))  # type: ignore[arg-type]
    deltas = [stream.feed(chunk).text for chunk in chunks[:-1]]
    return [*deltas, stream.finish(chunks[-1]).text]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_never_split_a_character(text: str) -> None:
    detok = IncrementalDetokenizer(byte_decode)
    deltas = [detok.step(b) for b in text.encode()]
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    assert "".join(deltas) == text
    assert detok.flush() == ""


@given(st.text())
def test_byte_tokens_property(text: str) -> None:
    detok = IncrementalDetokenizer(byte_decode)
    deltas = [detok.step(b) for b in text.encode()]
    assert "".join(deltas) + detok.flush() == text
    if REPLACEMENT_CHAR not in text:
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_incomplete_sequence_is_held_then_flushed() -> None:
    detok = IncrementalDetokenizer(byte_decode)
    assert [detok.step(b) for b in "a🎉".encode()[:3]] == ["a", "", ""]
    assert detok.pending_ids == 2
    assert detok.flush() == REPLACEMENT_CHAR


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_one_id_at_a_time_matches_decode(tokenizer: Tokenizer, text: str, skip: bool) -> None:
    ids = [1, *tokenizer.encode(text), 2]  # <|im_start|> … <|im_end|>
    deltas = stream_text(tokenizer, [[i] for i in ids] + [[]], skip_special_tokens=skip)
    assert "".join(deltas) == tokenizer.hf.decode(ids, skip_special_tokens=skip)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_split_at_every_token_boundary(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    expected = tokenizer.hf.decode(ids, skip_special_tokens=True)
    for k in range(len(ids) + 1):
        deltas = stream_text(tokenizer, [ids[:k], ids[k:]])
        assert "".join(deltas) == expected, f"split at {k}"
        assert REPLACEMENT_CHAR not in deltas[0]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=80), chunk=st.integers(1, 5))
def test_random_text_property(tokenizer: Tokenizer, text: str, chunk: int) -> None:
    ids = tokenizer.encode(text)
    chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)] + [[]]
    deltas = stream_text(tokenizer, chunks)
    expected = tokenizer.hf.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == expected
    if REPLACEMENT_CHAR not in expected:  # bytes the vocabulary lacks decode to U+FFFD
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_prompt_tail_gives_context_but_no_output(tokenizer: Tokenizer) -> None:
    prompt, output = tokenizer.encode("Say hi:"), tokenizer.encode(" 🎉 hi there")
    tail = prompt[-5:]
    deltas = stream_text(tokenizer, [[i] for i in output] + [[]], prompt_tail_ids=tuple(tail))
    full, context = tokenizer.decode(tail + output), tokenizer.decode(tail)
    assert "".join(deltas) == full[len(context) :] == " 🎉 hi there"


def test_truncated_character_is_flushed_on_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉")
    stream = tokenizer.new_detokenizer(DetokenizeOptions())
    held = stream.feed(ids[:-1])
    assert REPLACEMENT_CHAR not in held.text and held.num_tokens == len(ids) - 1
    last = stream.finish()
    assert held.text + last.text == tokenizer.decode(ids[:-1])
    assert last.finished and last.matched_stop is None


def test_spaces_between_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [1, *tokenizer.encode("user\nhi"), 2, 1]
    options = {"skip_special_tokens": False, "spaces_between_special_tokens": True}
    expected = "<|im_start|> user\nhi <|im_end|> <|im_start|>"
    assert tokenizer.decode(ids, **options) == expected
    assert "".join(stream_text(tokenizer, [[i] for i in ids] + [[]], **options)) == expected


def test_negative_ids_are_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequest):
        tokenizer.new_detokenizer(DetokenizeOptions()).feed([5, -1])
    with pytest.raises(InvalidRequest):
        DetokenizeOptions(prompt_tail_ids=(-3,))
