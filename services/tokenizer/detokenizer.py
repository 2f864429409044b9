"""Incremental detokenization: token ids in, text deltas out, never half a UTF-8 character.

The prefix-offset / read-offset algorithm (as in vLLM and TGI). Decoding one token on its own is
wrong for most tokenizers: byte-level BPE splits characters across tokens, and SentencePiece
decoders drop the leading space of the first token of a decode. So every step decodes a short
window of ids twice and emits only the difference:

    ids:   [ ........ | prefix_offset ....... | read_offset ....... ]
                        └─ prefix_text ──────┘                       (already emitted)
                        └─ new_text ─────────────────────────────────┘

The suffix `new_text[len(prefix_text):]` is emitted once `new_text` no longer ends with U+FFFD,
the replacement character a decoder produces for an incomplete UTF-8 sequence; until then the
offsets stay put and the window grows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

DecodeFn = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas.

    `decode` turns a list of ids into text (a fixed choice of special-token handling).
    `prompt_tail` are the last few prompt ids: context for the first output token, never output.
    Concatenating every `step` result and the final `flush` gives `decode(prompt_tail + ids)`
    minus `decode(prompt_tail)`.
    """

    def __init__(self, decode: DecodeFn, prompt_tail: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        """Adds one id; returns the text it completes (often "", e.g. mid-character)."""
        self.ids.append(token_id)
        prefix_text, new_text = self._window_texts()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """The text still held back (an incomplete sequence at the very end), as decoded."""
        prefix_text, new_text = self._window_texts()
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]

    @property
    def pending_ids(self) -> int:
        """Ids whose text has not been emitted yet."""
        return len(self.ids) - self.read_offset

    def _window_texts(self) -> tuple[str, str]:
        window = self.ids[self.prefix_offset :]
        prefix_text = self._decode(window[: self.read_offset - self.prefix_offset])
        return prefix_text, self._decode(window)
