"""Reasoning parsers: split a thinking model's answer into `reasoning_content` and `content`.

`REASONING_PARSERS[name]().parse(text)` gives `(reasoning, content)` (None for an empty part);
`.stream()` does the same incrementally: `feed(delta)` and `finish()` return `(kind, text)` pieces,
kind "reasoning" or "content". Streamed in any pieces, the pieces of each kind add up to the whole
parse's part, and the `<think>` / `</think>` markers never appear in either.

Both formats put the reasoning between `<think>` and `</think>`; they differ on an answer that
does not start with `<think>`:

- `deepseek-r1`: it is reasoning anyway (DeepSeek-R1's template, and Qwen3 "Thinking-2507"
  models', put `<think>` in the prompt), up to `</think>`, and all reasoning if there is none;
- `qwen3`: it is all content (Qwen3 with `enable_thinking=False`, or a non-thinking answer).

An answer cut short inside `<think>` (no `</think>` yet) is reasoning in both. `<think>` counts
only at the very start of the answer (after whitespace); the whitespace right after `</think>`
(Qwen3 and R1 write "\\n\\n") is dropped. These follow vLLM's `deepseek_r1` and `qwen3` parsers,
except that vLLM's whole-answer `qwen3` returns an unterminated `<think>...` as content while its
streaming path returns it as reasoning; here both are reasoning, so whole and streamed agree.
"""

from __future__ import annotations

from typing import ClassVar

from services.gateway.tools.scanning import holdback

REASONING = "reasoning"
CONTENT = "content"
THINK, END_THINK = "<think>", "</think>"


class ReasoningStream:
    """Incremental reasoning split of one answer: `feed` each delta, then `finish`."""

    def __init__(self, implicit_think: bool) -> None:
        self._implicit = implicit_think  # no leading <think>: reasoning anyway?
        self._buf = ""
        self._final = False
        self._state = self._start
        self._out: list[tuple[str, str]] = []

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Consume the next piece; return the decided `(kind, text)` pieces."""
        assert not self._final, "feed after finish"
        self._buf += text
        return self._run()

    def finish(self) -> list[tuple[str, str]]:
        """The answer is complete: decide what was held back."""
        self._final = True
        out = self._run()
        assert not self._buf
        return out

    def _run(self) -> list[tuple[str, str]]:
        while self._state():
            pass
        out, self._out = self._out, []
        return out

    def _emit(self, kind: str, text: str) -> None:
        if text:
            self._out.append((kind, text))

    def _start(self) -> bool:
        s = self._buf.lstrip()
        if THINK.startswith(s) and not self._final:
            return False  # still whitespace or a prefix of <think>
        if s.startswith(THINK):
            self._buf = s[len(THINK) :]
            self._state = self._reasoning
        else:
            self._state = self._reasoning if self._implicit else self._content
        return True

    def _reasoning(self) -> bool:
        i = self._buf.find(END_THINK)
        if i < 0:
            keep = len(self._buf) if self._final else holdback(self._buf, END_THINK)
            self._emit(REASONING, self._buf[:keep])
            self._buf = self._buf[keep:]
            return False
        self._emit(REASONING, self._buf[:i])
        self._buf = self._buf[i + len(END_THINK) :]
        self._state = self._after_think
        return True

    def _after_think(self) -> bool:
        s = self._buf.lstrip()
        if not s and not self._final:
            self._buf = ""
            return False
        self._buf = s
        self._state = self._content
        return True

    def _content(self) -> bool:
        self._emit(CONTENT, self._buf)
        self._buf = ""
        return False


class ReasoningParser:
    """A reasoning format. Stateless: `parse` a whole answer, or `stream()` one."""

    name: ClassVar[str]
    # Does an answer that does not start with <think> begin inside the reasoning?
    implicit_think: ClassVar[bool]

    def stream(self) -> ReasoningStream:
        """A fresh incremental parser for one answer."""
        return ReasoningStream(self.implicit_think)

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer, None for an empty part."""
        s = self.stream()
        pieces = s.feed(text) + s.finish()
        reasoning = "".join(t for kind, t in pieces if kind == REASONING)
        content = "".join(t for kind, t in pieces if kind == CONTENT)
        return reasoning or None, content or None


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1 (and R1-Distill, QwQ, Qwen3 Thinking-2507): reasoning up to `</think>`,
    with or without a leading `<think>`:

        <think>The user wants 2+2.</think>\\n\\nIt is 4.   → ("The user wants 2+2.", "It is 4.")
        The user wants 2+2.</think>It is 4.             → the same
        The user wants 2+2.                             → ("The user wants 2+2.", None)

    From DeepSeek-R1's chat template and vLLM / SGLang parser `deepseek_r1` / `deepseek-r1`.
    """

    name = "deepseek-r1"
    implicit_think = True


class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3 hybrid thinking: reasoning only inside a leading `<think>...</think>`:

        <think>\\nThe user wants 2+2.\\n</think>\\n\\nIt is 4.   → ("\\nThe user wants 2+2.\\n", "It is 4.")
        It is 4.                                            → (None, "It is 4.")

    From Qwen3's chat template (`enable_thinking`) and vLLM / SGLang parser `qwen3`.
    """

    name = "qwen3"
    implicit_think = False


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}
