"""The machinery every tool-call format's incremental parser is built on.

A format is a small state machine over a text buffer: each state is a method that decides what
it can from the buffer's head (emit content, open or close a call, move to another state) and
returns True to be run again, or False when it needs more text. Because a state only decides
what no later text could change, feeding the answer in any pieces gives the same deltas'
sum as feeding it whole, and `ToolParser.parse` is literally "feed it whole, then finish".

Content policy, shared by all formats: whitespace that touches a tool call (before or after it)
is dropped, so "Let me check.\\n\\n<tool_call>…</tool_call>\\n" has content "Let me check.";
everything else is passed through as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.gateway.tools.calls import Delta, ToolCallDelta, new_call_id
from services.gateway.tools.scanning import (
    BROKEN,
    INCOMPLETE,
    BracketSpan,
    calls_from_json,
    dumps,
    holdback,
    leading_name,
    loads_or_none,
)

# Outcomes of reading a JSON call body (`ToolCallStream._json_body`).
WAIT = "wait"  # needs more text
DONE = "done"  # the call(s) were emitted; the buffer now starts after the JSON value
DEGRADE = "degrade"  # not a call: its opening markup was given back as content
BROKEN_CALL = "broken"  # an already-named call went bad: closed with `{}`, drop its rest

State = Callable[[], bool]


class ToolCallStream:
    """Incremental parser of one answer: `feed(delta_text)` as text arrives, then `finish()`.

    Both return the new deltas: content text (`str`) and `ToolCallDelta`s. Text that may be the
    start of a marker is held back until it is decided, so markup never reaches content.
    """

    def __init__(self) -> None:
        self._buf = ""  # undecided text
        self._final = False  # finish() was called: no more text will come
        self._out: list[Delta] = []
        self._ws = ""  # trailing whitespace of content, held: dropped if a call follows
        self._after_call = False  # a call just ended: leading whitespace is dropped
        self._index = -1  # the current (last opened) call's index
        self._state: State = self._start
        self._raw = ""  # the markup that opened the current body, given back if not a call
        self._span = BracketSpan()
        self._name: str | None = None  # the body's early name: None undecided, "" none

    def feed(self, text: str) -> list[Delta]:
        """Consume the next piece of the answer; return what it decided."""
        assert not self._final, "feed after finish"
        self._buf += text
        return self._run()

    def finish(self) -> list[Delta]:
        """The answer is complete: decide everything held back."""
        self._final = True
        out = self._run()
        assert not self._buf, f"{type(self).__name__} left {self._buf!r} undecided"
        if self._ws:
            out.append(self._ws)
            self._ws = ""
        return out

    def _run(self) -> list[Delta]:
        while self._state():
            pass
        out, self._out = self._out, []
        return out

    def _start(self) -> bool:
        raise NotImplementedError

    # emitting -------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        text = self._ws + text
        core = text.rstrip()
        self._ws = text[len(core) :]
        if core:
            self._out.append(core)

    def _open_call(self, name: str, args: dict[str, Any] | None = None) -> None:
        """A call's first delta: id and name, and its arguments if already known."""
        self._ws = ""
        self._index += 1
        self._out.append(ToolCallDelta(self._index, new_call_id(), name, ""))
        if args is not None:
            self._close_call(args)

    def _close_call(self, args: dict[str, Any]) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == self._index and not last.arguments:
            self._out[-1] = ToolCallDelta(last.index, last.id, last.name, dumps(args))
        else:
            self._out.append(ToolCallDelta(self._index, None, None, dumps(args)))
        self._after_call = True

    # shared states --------------------------------------------------------------------------

    def _goto(self, outcome: str, states: dict[str, State]) -> bool:
        if outcome == WAIT:
            return False
        self._state = states[outcome]
        return True

    def _scan_text(self, marker: str, on_marker: State) -> bool:
        """Content up to `marker`; at it, drop the marker and go to `on_marker`."""
        i = self._buf.find(marker)
        if i < 0:
            keep = len(self._buf) if self._final else holdback(self._buf, marker)
            self._content(self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._content(self._buf[:i])
        self._buf = self._buf[i + len(marker) :]
        self._begin_body(marker)
        self._state = on_marker
        return True

    def _discard_to_end(self) -> bool:
        self._buf = ""
        return False

    def _plain(self) -> bool:
        """Everything from here on is content."""
        self._content(self._buf)
        self._buf = ""
        return False

    # JSON call bodies -----------------------------------------------------------------------

    def _begin_body(self, raw: str) -> None:
        self._raw = raw
        self._span = BracketSpan()
        self._name = None

    def _degrade(self) -> str:
        self._content(self._raw)
        return DEGRADE

    def _json_body(self, arrays: bool) -> str:
        """Read `{"name": ..., "arguments": {...}}` (or, if `arrays`, a list of those) at the
        buffer's head, after optional whitespace. The name is emitted as soon as it is certain;
        the arguments once the object is complete."""
        s = self._buf.lstrip()
        if not s:
            return self._degrade() if self._final else WAIT
        if s[0] != "{" and not (arrays and s[0] == "["):
            return self._degrade()
        if s[0] == "{" and self._name is None:
            self._name = leading_name(s)
            if self._name:
                self._open_call(self._name)
        end = self._span.scan(s)
        if end == INCOMPLETE and not self._final:
            return WAIT
        if end in (INCOMPLETE, BROKEN):
            if not self._name:
                return self._degrade()
            self._close_call({})
            return BROKEN_CALL
        calls = calls_from_json(loads_or_none(s[:end]))
        if self._name:
            self._close_call(calls[0][1] if calls else {})
        elif calls is None:
            return self._degrade()
        else:
            for name, args in calls:
                self._open_call(name, args)
        self._buf = s[end:]
        return DONE
