"""One Detokenize stream: incremental detokenization followed by stop strings and regexes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.stop_regex import compile_stop_regex
from services.tokenizer.detokenizer import DecodeFn, IncrementalDetokenizer
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.stop import StopChecker


@dataclass(frozen=True)
class DetokenizeOptions:
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = False
    stop: tuple[str, ...] = ()
    stop_regex: tuple[str, ...] = ()  # Python regular expressions; a match ends the stream too
    include_stop_str_in_output: bool = False  # the matched stop string (or regex match) is kept
    prompt_tail_ids: tuple[int, ...] = ()
    min_tokens: int = 0  # stop strings are looked for only from this output token on

    def __post_init__(self) -> None:
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty")
        for pattern in self.stop_regex:
            try:
                compile_stop_regex(pattern)
            except ValueError as exc:
                raise InvalidRequest(f"stop_regex: {exc}") from None
        check_ids(self.prompt_tail_ids)


@dataclass(frozen=True)
class Delta:
    """The answer to one message of token ids."""

    text: str
    # Ids of the message consumed: all, or those through the one that completed a stop.
    num_tokens: int
    matched_stop: str | None = None  # the stop string, or the pattern of the stop regex
    # Nothing follows: a stop matched or the stream was finished.
    finished: bool = False


def check_ids(ids: Sequence[int]) -> None:
    if any(i < 0 for i in ids):
        raise InvalidRequest("token ids must not be negative")


class DetokenizeStream:
    """Text deltas for one request's output ids; never half a character, never a stop string.

    Not thread-safe: one caller feeds it, in order. Once a Delta has `finished` set, it takes
    no more ids.
    """

    def __init__(self, decode: DecodeFn, options: DetokenizeOptions) -> None:
        self.detokenizer = IncrementalDetokenizer(decode, options.prompt_tail_ids)
        self.stops = StopChecker(
            options.stop, options.include_stop_str_in_output, options.stop_regex
        )
        self.min_tokens = options.min_tokens
        self.seen = 0  # output tokens fed so far
        self.finished = False

    def feed(self, ids: Sequence[int]) -> Delta:
        """Adds ids; returns the text that may be sent now."""
        if self.finished:
            raise InvalidRequest("the stream already finished")
        check_ids(ids)
        parts: list[str] = []
        for n, token_id in enumerate(ids, start=1):
            self.seen += 1
            text = self.detokenizer.step(token_id)
            if self.seen <= self.min_tokens:  # min_tokens holds back stop strings too
                parts.append(text)
                continue
            out = self.stops.feed(text)
            parts.append(out.text)
            if out.matched is not None:
                self.finished = True
                return Delta("".join(parts), n, out.matched, finished=True)
        return Delta("".join(parts), len(ids))

    def finish(self, ids: Sequence[int] = ()) -> Delta:
        """Adds the last ids and flushes all held-back text."""
        delta = self.feed(ids)
        if delta.finished:
            return delta
        self.finished = True
        out = self.stops.feed(self.detokenizer.flush())
        tail = out.text if out.matched is not None else out.text + self.stops.flush()
        return Delta(delta.text + tail, delta.num_tokens, out.matched, finished=True)
