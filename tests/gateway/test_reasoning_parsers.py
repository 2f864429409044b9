"""Reasoning parsers: exact (reasoning, content) per format, and streaming at every split point
(and random ones) against the whole-answer result."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.tools.reasoning import REASONING_PARSERS

# (parser, model output, expected reasoning, expected content)
CASES: list[tuple[str, str, str | None, str | None]] = [
    ("deepseek-r1", "<think>Add them.</think>\n\nIt is 4.", "Add them.", "It is 4."),
    ("deepseek-r1", "Add them.</think>It is 4.", "Add them.", "It is 4."),  # <think> in the prompt
    ("deepseek-r1", "\n<think>\nAdd them.\n</think>\n\nIt is 4.\n", "\nAdd them.\n", "It is 4.\n"),
    ("deepseek-r1", "Still thinking, cut short", "Still thinking, cut short", None),
    ("deepseek-r1", "<think>Cut short <", "Cut short <", None),
    ("deepseek-r1", "<think></think>Only an answer.", None, "Only an answer."),
    ("deepseek-r1", "Done.</think>", "Done.", None),
    ("deepseek-r1", "", None, None),
    ("deepseek-r1", "<thi", "<thi", None),
    ("deepseek-r1", "a </think> b </think> c", "a ", "b </think> c"),
    ("deepseek-r1", "<think>日本語 🙂</think>ü", "日本語 🙂", "ü"),
    ("qwen3", "<think>\nAdd them.\n</think>\n\nIt is 4.", "\nAdd them.\n", "It is 4."),
    ("qwen3", "It is 4.", None, "It is 4."),
    ("qwen3", "  It is 4.  ", None, "  It is 4.  "),
    ("qwen3", "<think>Cut short", "Cut short", None),
    ("qwen3", "<think>\n\n</think>\n\nNo thinking.", "\n\n", "No thinking."),
    ("qwen3", "Use <think> tags like this.", None, "Use <think> tags like this."),
    ("qwen3", "<think", None, "<think"),
    ("qwen3", "", None, None),
    ("qwen3", "<think>a</think>b <think>c</think>", "a", "b <think>c</think>"),
]


def ids(case: tuple[str, str, str | None, str | None]) -> str:
    return f"{case[0]}:{case[1][:30]!r}"


def streamed(parser: str, pieces: list[str]) -> tuple[str | None, str | None]:
    s = REASONING_PARSERS[parser]().stream()
    out = [x for p in pieces for x in s.feed(p)] + s.finish()
    assert all(kind in ("reasoning", "content") and text for kind, text in out)
    reasoning = "".join(t for k, t in out if k == "reasoning")
    content = "".join(t for k, t in out if k == "content")
    return reasoning or None, content or None


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_whole_answer(case: tuple[str, str, str | None, str | None]) -> None:
    parser, text, reasoning, content = case
    assert REASONING_PARSERS[parser]().parse(text) == (reasoning, content)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_every_two_piece_split_and_char_by_char(
    case: tuple[str, str, str | None, str | None],
) -> None:
    parser, text, reasoning, content = case
    for cut in range(len(text) + 1):
        assert streamed(parser, [text[:cut], text[cut:]]) == (reasoning, content)
    assert streamed(parser, list(text)) == (reasoning, content)


def test_reasoning_streams_as_it_arrives_and_holds_only_a_possible_marker() -> None:
    s = REASONING_PARSERS["deepseek-r1"]().stream()
    assert s.feed("<thi") == []
    assert s.feed("nk>Let me see</th") == [("reasoning", "Let me see")]
    assert s.feed("ink>\n\n") == []
    assert s.feed("Four.") == [("content", "Four.")]
    assert s.finish() == []


PIECE = st.sampled_from(["<think>", "</think>", "<", "</", "think>", "\n", " ", "a", "é", ">"])


@settings(max_examples=300, deadline=None)
@given(
    parser=st.sampled_from(sorted(REASONING_PARSERS)),
    text=st.lists(PIECE, max_size=12).map("".join),
    data=st.data(),
)
def test_random_answers_at_random_splits(parser: str, text: str, data: st.DataObject) -> None:
    whole = REASONING_PARSERS[parser]().parse(text)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert streamed(parser, pieces) == whole
    reasoning, content = whole
    # the first <think> and the first </think> after it are markers, never text
    if parser == "qwen3" and not text.lstrip().startswith("<think>"):
        assert (reasoning, content) == (None, text or None)
    else:
        assert "</think>" not in (reasoning or "")
        if "</think>" not in text:
            assert content is None
