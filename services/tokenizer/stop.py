"""Stop strings and stop regexes over streamed text: never emit text at or past a stop.

Text arrives in pieces, and a stop may span pieces. The checker holds back the pending text that
might still become part of a stop — the longest suffix that is a prefix of some stop string, and
the text from where a stop regex has a partial match (one the text ends inside) — and emits the
rest. When a stop string appears or a regex matches, the text before it (or through it, if asked)
is emitted and the checker is done.

Regexes follow Python's `re`; the partial matches that decide what to hold back come from the
`regex` package, whose syntax is a superset of `re`'s. A pattern only `re` compiles is searched
from the start of the text every time and holds nothing back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import regex

from services.common.stop_regex import compile_stop_regex


@dataclass(frozen=True)
class StopOutput:
    text: str
    # The stop string (or the regex pattern) that matched in this piece, if any.
    matched: str | None = None


class StopRegex:
    """One stop regex: `re` for matches, `regex` (when it compiles the pattern) for partial ones."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.full = compile_stop_regex(pattern)
        try:
            self.partial: regex.Pattern | None = regex.compile(pattern)
        except regex.error:
            self.partial = None

    def search(self, text: str, pos: int) -> tuple[int, int] | None:
        """(start, end) of the first match starting at or after `pos` (from 0 without partial
        matching: then text already emitted may belong to the match)."""
        m = self.full.search(text, pos if self.partial is not None else 0)
        return None if m is None else (m.start(), m.end())

    def held_from(self, text: str, pos: int) -> int:
        """Where a match that the coming text could complete starts (len(text): nowhere)."""
        if self.partial is None:
            return len(text)
        m = self.partial.search(text, pos, partial=True)
        return len(text) if m is None else m.start()


class StopChecker:
    """Filters a text stream against stop strings and stop regexes.

    Among matches, the one that completes first in the stream wins (the longest, on a tie), so
    the result of stop strings does not depend on how the text was split into pieces; a regex
    matches as soon as the text so far holds a match.
    """

    def __init__(
        self, stops: Iterable[str], include_stop: bool = False, regexes: Iterable[str] = ()
    ) -> None:
        self.stops = tuple(stops)
        assert all(self.stops), "stop strings must not be empty"
        self.regexes = tuple(StopRegex(p) for p in regexes)
        self.include_stop = include_stop
        self.text = ""  # everything fed: text[:sent] was emitted, text[sent:] is pending
        self.sent = 0
        self.matched: str | None = None

    @property
    def pending(self) -> str:
        return self.text[self.sent :]

    def feed(self, text: str) -> StopOutput:
        """Adds a piece of text; returns what may be emitted now."""
        assert self.matched is None, "fed after a stop matched"
        self.text += text
        match = self._first_match()
        if match is not None:
            start, end, stop = match
            out = self.text[self.sent : end if self.include_stop else start]
            self.sent, self.matched = len(self.text), stop
            return StopOutput(out, stop)
        held = min(
            [self._string_held_from(), *(r.held_from(self.text, self.sent) for r in self.regexes)]
        )
        assert held >= self.sent
        out, self.sent = self.text[self.sent : held], held
        return StopOutput(out)

    def flush(self) -> str:
        """The held-back text, emitted when the stream ends without a match."""
        text, self.sent = self.pending, len(self.text)
        return text

    def _first_match(self) -> tuple[int, int, str] | None:
        """(start, end, stop) of the match with the smallest end, longest first on a tie."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = self.text.find(stop, self.sent)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        for r in self.regexes:
            found = r.search(self.text, self.sent)
            if found is not None and (best is None or (found[1], found[0]) < best[:2]):
                best = (found[1], found[0], r.pattern)
        return None if best is None else (best[1], best[0], best[2])

    def _string_held_from(self) -> int:
        """Start of the longest suffix of the pending text that is a proper prefix of a stop
        string (len(text): none)."""
        pending, longest = self.pending, 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:k]):
                    longest = k
                    break
        return len(self.text) - longest
