"""In-process stand-ins for the gateway's gRPC clients (no processes, no model)."""

from __future__ import annotations

from dataclasses import replace

from services.gateway.events import SampleEnd, TextDelta, TokenChunk, TokenPiece
from services.gateway.sampling import GenerationInput, TextOptions
from services.tokenizer.stream import DetokenizeOptions, DetokenizeStream

# Between two events in a FakeStream: they come from different scheduler steps.
STEP = object()


def char_decode(ids: list[int]) -> str:
    """A toy vocabulary: token id i is the character chr(i)."""
    return "".join(chr(i) for i in ids)


def ids_of(text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeDetokenizer:
    """The tokenizer service's real DetokenizeStream over the toy vocabulary."""

    def __init__(self, text: TextOptions) -> None:
        options = DetokenizeOptions(
            stop=text.stop,
            stop_regex=text.stop_regex,
            include_stop_str_in_output=text.include_stop_str_in_output,
        )
        self.stream = DetokenizeStream(char_decode, options)
        self.finished = False
        self.cancelled = False

    async def feed(self, ids: list[int], finish: bool = False) -> TextDelta:
        delta = self.stream.finish(ids) if finish else self.stream.feed(ids)
        self.finished = delta.finished
        return TextDelta(delta.text, delta.num_tokens, delta.matched_stop, delta.finished)

    def cancel(self) -> None:
        self.cancelled = True


class FakeTokenizer:
    def __init__(self) -> None:
        self.detokenizers: list[FakeDetokenizer] = []
        self.links: list[object] = []  # the span context each sample was opened with

    async def detokenizer(self, inp: GenerationInput, index: int, link=None) -> FakeDetokenizer:
        detok = FakeDetokenizer(inp.text)
        self.detokenizers.append(detok)
        self.links.append(link)
        return detok

    async def token_pieces(self, ids) -> dict[int, TokenPiece]:
        return {i: TokenPiece(chr(i), chr(i).encode()) for i in ids}


class FakeStream:
    """The events of one request, as RequestEvents gives them: a sample's end right after its
    last chunk rides on that chunk (the scheduler finished it in the step that made the tokens)
    unless STEP stands between them."""

    def __init__(self, events: list[TokenChunk | SampleEnd | Exception | object]) -> None:
        self.events = list(events)
        self.cancelled = False

    async def next(self) -> TokenChunk | SampleEnd | None:
        while self.events and self.events[0] is STEP:
            self.events.pop(0)
        if not self.events:
            return None
        event = self.events.pop(0)
        if isinstance(event, Exception):
            raise event
        after = self.events[0] if self.events else None
        ends_it = isinstance(after, SampleEnd) and after.index == getattr(event, "index", None)
        if isinstance(event, TokenChunk) and ends_it:
            self.events.pop(0)
            return replace(event, end=after)  # type: ignore[arg-type]
        return event  # type: ignore[return-value]

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    address = "fake:0"

    def __init__(self, events: list[TokenChunk | SampleEnd | Exception]) -> None:
        self.stream = FakeStream(events)
        self.aborted: list[str] = []
        self.traceparent = ""  # what the last request was sent with

    def generate(self, inp: GenerationInput, timeout_s: float, traceparent: str = "") -> FakeStream:
        self.traceparent = traceparent
        return self.stream

    def abort_soon(self, request_id: str) -> None:
        self.aborted.append(request_id)


def chunks_of(
    text: str, index: int = 0, size: int = 2, prompt: int = 3, logprobs: bool = False
) -> list[TokenChunk]:
    """`text` as the scheduler would stream it, `size` tokens per chunk."""
    ids = ids_of(text)
    out = []
    for start in range(0, len(ids), size):
        part = ids[start : start + size]
        lps = [-0.5] * len(part) if logprobs else []
        tops = part if logprobs else []
        out.append(TokenChunk(index, part, lps, tops, lps, prompt, start + len(part), 1))
    return out


def end_of(
    text: str, reason: str, index: int = 0, prompt: int = 3, stop_token: int | None = None
) -> SampleEnd:
    """The end after `text`; "stop" counts a stop token (`stop_token`, the EOS id 0 by default)."""
    if reason == "stop" and stop_token is None:
        stop_token = 0
    return SampleEnd(index, reason, prompt, len(text) + (reason == "stop"), 1, stop_token)
