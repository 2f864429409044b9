"""Stop strings: nothing at or past a stop string is ever emitted, however the text is split."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tokenizer.errors import InvalidRequest
from services.tokenizer.stop import StopChecker
from services.tokenizer.stream import DetokenizeOptions
from services.tokenizer.tokenizer import Tokenizer


def run(pieces: list[str], stops: list[str], include: bool = False) -> tuple[str, str | None]:
    """(everything emitted, matched stop) for text arriving in `pieces`."""
    return run_regex(pieces, [], include, stops)


@pytest.mark.parametrize(
    ("pieces", "stops", "include", "expected"),
    [
        (["hello world"], ["world"], False, ("hello ", "world")),
        (["hello world"], ["world"], True, ("hello world", "world")),
        (["hel", "lo wo", "rld!"], ["world"], False, ("hello ", "world")),
        (["hel", "lo wo", "rld!"], ["world"], True, ("hello world", "world")),
        (["a", "b", "c"], ["abc"], False, ("", "abc")),
        (["wor", "m"], ["world"], False, ("worm", None)),
        (["abcd"], ["abcd", "bc"], False, ("a", "bc")),
        (["xab", "c"], ["abc", "ab"], True, ("xab", "ab")),
        (["x", "abc"], ["abc", "ab"], True, ("xab", "ab")),
        (["abc"], ["bc", "abc"], True, ("abc", "abc")),
        (["abc"], ["bc", "abc"], False, ("", "abc")),
        (["no stop here"], [], False, ("no stop here", None)),
        (["a\n\nb"], ["\n\n", "b"], False, ("a", "\n\n")),
    ],
)
def test_table(pieces: list[str], stops: list[str], include: bool, expected: tuple) -> None:
    assert run(pieces, stops, include) == expected


def test_holds_back_only_a_possible_prefix() -> None:
    checker = StopChecker(["</answer>", "STOP"])
    assert checker.feed("the answer </ans").text == "the answer "
    assert checker.pending == "</ans"
    assert checker.feed("wer? no").text == "</answer? no"
    assert checker.feed(" ST").text == " "
    assert checker.flush() == "ST"


@given(
    text=st.text(alphabet="ab c", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    include=st.booleans(),
)
def test_split_does_not_matter(text: str, stops: list[str], cuts: list[int], include: bool) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    emitted, matched = run(pieces, stops, include)
    assert (emitted, matched) == run(list(text), stops, include)
    assert text.startswith(emitted)
    if matched is None:
        assert emitted == text and not any(s in text for s in stops)
    else:
        body = emitted[: len(emitted) - len(matched)] if include else emitted
        assert not any(s in body for s in stops)
        assert emitted.endswith(matched) if include else text[len(emitted) :].startswith(matched)


def detokenize(
    tok: Tokenizer, ids: list[int], chunk: int = 1, **options: object
) -> tuple[str, int, str | None]:
    """(text, ids consumed, matched stop) of a stream fed `chunk` ids per message."""
    stream = tok.new_detokenizer(DetokenizeOptions(**options))  # type: ignore[arg-type]
    text, consumed = "", 0
    for start in range(0, len(ids), chunk):
        delta = stream.feed(ids[start : start + chunk])
        text, consumed = text + delta.text, consumed + delta.num_tokens
        if delta.finished:
            return text, consumed, delta.matched_stop
    last = stream.finish()
    return text + last.text, consumed, last.matched_stop


def test_stop_spanning_token_boundaries(tokenizer: Tokenizer) -> None:
    text = "The answer is 42. STOP and nothing after STOP."
    ids = tokenizer.encode(text)
    assert "STOP" not in {tokenizer.decode([i]) for i in ids}  # the stop spans tokens
    for chunk in (1, 2, 3, len(ids)):
        out, consumed, matched = detokenize(tokenizer, ids, chunk, stop=("STOP",))
        assert (out, matched) == ("The answer is 42. ", "STOP")
        assert tokenizer.decode(ids[:consumed]).endswith("STOP")
        assert not tokenizer.decode(ids[: consumed - 1]).endswith("STOP")


def test_several_stops_first_to_appear_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("一二三 🎉 end. Goodbye!\n\nUser:")
    stops = ("User:", "\n\n", "🎉")
    out, _, matched = detokenize(tokenizer, ids, stop=stops)
    assert (out, matched) == ("一二三 ", "🎉")
    out, _, matched = detokenize(tokenizer, ids, 4, stop=stops[:2], include_stop_str_in_output=True)
    assert (out, matched) == ("一二三 🎉 end. Goodbye!\n\n", "\n\n")


def test_unmatched_prefix_is_flushed_on_finish(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("almost a stop: </ans")
    out, consumed, matched = detokenize(tokenizer, ids, stop=("</answer>",))
    assert (out, consumed, matched) == ("almost a stop: </ans", len(ids), None)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", ["world", "é w", "界", "👍", "o"])
def test_stop_never_in_output(tokenizer: Tokenizer, stop: str, include: bool) -> None:
    ids = tokenizer.encode("Hellé wörld 世界 👍 hello world 世界 👍")
    for chunk in (1, 3):
        out, _, matched = detokenize(
            tokenizer, ids, chunk, stop=(stop,), include_stop_str_in_output=include
        )
        assert matched == stop
        assert stop not in (out[: -len(stop)] if include else out)
        assert out.endswith(stop) == include


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet="ab c,é世🎉", max_size=40),
    stop=st.text(alphabet="ab c,é世🎉", min_size=1, max_size=3),
)
def test_stop_property_with_real_tokens(tokenizer: Tokenizer, text: str, stop: str) -> None:
    ids = tokenizer.encode(text)
    out, _, matched = detokenize(tokenizer, ids, stop=(stop,))
    full = tokenizer.decode(ids)
    assert stop not in out
    assert out == (full[: full.index(stop)] if matched else full)


def test_empty_stop_is_rejected() -> None:
    with pytest.raises(InvalidRequest):
        DetokenizeOptions(stop=("ok", ""))


def test_min_tokens_holds_back_stop_strings(tokenizer: Tokenizer) -> None:
    """The months example: with "," as a stop and min_tokens 8, the stream runs past the commas
    of its first 8 tokens and stops at the first comma after them."""
    ids = tokenizer.encode(" February, March, April, May, June, July, August")
    for chunk in (1, 3, len(ids)):
        out, consumed, matched = detokenize(tokenizer, ids, chunk, stop=(",",), min_tokens=8)
        assert consumed > 8 and matched == ","
        assert out == tokenizer.decode(ids[: consumed - 1]) and out.count(",") >= 3
    out, consumed, _ = detokenize(tokenizer, ids, 1, stop=(",",))
    assert (out, consumed) == (" February", 2)  # without min_tokens: the first comma


# ---- stop regexes ------------------------------------------------------------------------------


def run_regex(pieces: list[str], regexes: list[str], include: bool = False, stops=()) -> tuple:
    """(everything emitted, matched stop or regex) for text arriving in `pieces`."""
    checker = StopChecker(stops, include, regexes)
    emitted = []
    for piece in pieces:
        out = checker.feed(piece)
        emitted.append(out.text)
        if out.matched is not None:
            return "".join(emitted), out.matched
    return "".join(emitted) + checker.flush(), None


@pytest.mark.parametrize(
    ("pieces", "regexes", "include", "expected"),
    [
        (["Total: 42 apples"], [r"\d+"], False, ("Total: ", r"\d+")),
        (["Total: 4", "2 apples"], [r"\d+"], True, ("Total: 4", r"\d+")),
        (["The end", ". More"], [r"end\."], False, ("The ", r"end\.")),
        (["The end", ". More"], [r"end\."], True, ("The end.", r"end\.")),
        (["ending well"], [r"end\."], False, ("ending well", None)),
        (["a", "b", "c"], [r"b+c"], False, ("a", "b+c")),
        (["x ab", "c"], [r"abc"], False, ("x ", "abc")),
        (["yes", " no"], [r"^no"], False, ("yes no", None)),  # ^ is the text's start only
        (["no", " yes"], [r"^no"], False, ("", "^no")),
        (["Q: ", "A: 7"], [r"A: \d"], False, ("Q: ", r"A: \d")),
    ],
)
def test_regex_table(pieces: list[str], regexes: list[str], include: bool, expected: tuple) -> None:
    assert run_regex(pieces, regexes, include) == expected


def test_a_regex_holds_back_text_a_match_may_start_with() -> None:
    checker = StopChecker([], regexes=[r"\[\d+\]"])
    assert checker.feed("see [1").text == "see "
    assert checker.pending == "[1"
    assert checker.feed("x] and").text == "[1x] and"
    out = checker.feed(" [22]")
    assert (out.text, out.matched) == (" ", r"\[\d+\]")


def test_strings_and_regexes_the_first_to_complete_wins() -> None:
    assert run_regex(["abc 12 STOP"], [r"\d+"], stops=["STOP"]) == ("abc ", r"\d+")
    assert run_regex(["abc STOP 12"], [r"\d+"], stops=["STOP"]) == ("abc ", "STOP")


@given(
    text=st.text(alphabet="ab 1.", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    pattern=st.sampled_from([r"1\.b+", r"a a", r"b\.?1"]),
)
def test_regex_split_does_not_matter(text: str, cuts: list[int], pattern: str) -> None:
    """Fed in any pieces, the text emitted is the text before the first match, and nothing a
    match starts with comes out before it is known not to be one."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    found = re.search(pattern, text)
    expected = (text, None) if found is None else (text[: found.start()], pattern)
    assert run_regex(pieces, [pattern]) == expected


@pytest.mark.parametrize(
    ("pattern", "error"), [("(", "invalid regular expression"), ("a*", "empty")]
)
def test_a_bad_regex_is_refused(pattern: str, error: str) -> None:
    with pytest.raises(InvalidRequest, match=error):
        DetokenizeOptions(stop_regex=(pattern,))
