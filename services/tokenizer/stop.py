"""Stop strings over streamed text: never emit text at or past a stop string.

Text arrives in pieces, and a stop string may span pieces. The checker holds back the longest
suffix of the pending text that is a prefix of some stop string (it might become one) and emits
the rest. When a stop string appears, the text before it (or through it, if asked) is emitted
and the checker is done.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class StopOutput:
    text: str
    # The stop string that matched in this piece, if any.
    matched: str | None = None


class StopChecker:
    """Filters a text stream against stop strings.

    Among matches, the one that completes first in the stream wins (the longest, on a tie), so
    the result does not depend on how the text was split into pieces.
    """

    def __init__(self, stops: Iterable[str], include_stop: bool = False) -> None:
        self.stops = tuple(stops)
        assert all(self.stops), "stop strings must not be empty"
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> StopOutput:
        """Adds a piece of text; returns what may be emitted now."""
        assert self.matched is None, "fed after a stop string matched"
        buf = self.pending + text
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self.pending, self.matched = "", stop
            return StopOutput(buf[: start + len(stop) if self.include_stop else start], stop)
        held = self._held_length(buf)
        self.pending = buf[len(buf) - held :]
        return StopOutput(buf[: len(buf) - held])

    def flush(self) -> str:
        """The held-back text, emitted when the stream ends without a match."""
        text, self.pending = self.pending, ""
        return text

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the match with the smallest end, longest first on a tie."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = buf.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _held_length(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:k]):
                    longest = k
                    break
        return longest
