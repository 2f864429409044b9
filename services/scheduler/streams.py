"""Per-request output streams: the loop pushes, the RPC handler drains, nobody waits on the other.

The scheduler loop only appends to a stream's buffers and sets an event; it never awaits a reader.
The reader takes everything pending at once, so a slow client gets one coalesced chunk per sample
covering several steps instead of stalling the loop or building a queue of small messages.

Prompt logprobs are pushed once, complete, before the sample's first token: they ride in its first
chunk, which carries no tokens when the reader takes it before one arrives (or when the sample
ends on a stop token, which is never streamed).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from services.scheduler.request import FinishReason, PromptLogprobs


@dataclass
class Chunk:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # empty unless requested
    top_ids: list[int] = field(default_factory=list)  # flattened, top_logprobs per token
    top_logprobs: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt: PromptLogprobs | None = None  # prompt logprobs: only in a sample's first chunk


@dataclass
class Complete:
    index: int
    reason: FinishReason
    matched_stop: int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failure:
    code: int  # google.rpc.Code
    message: str


Event = Chunk | Complete | Failure


@dataclass
class Token:
    """One sampled token as the executor returned it."""

    token_id: int
    logprob: float = math.nan
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


class OutputStream:
    """Events of one GenerateRequest's n samples; single producer (the loop), single consumer.

    `on_event`, when given, is called after every push, complete or fail (from the loop, so it
    must not block): a multiplexed Stream call uses it to learn which of its requests have
    something to take.
    """

    def __init__(
        self,
        n: int,
        prompt_tokens: int,
        logprobs: bool,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self.n, self.prompt_tokens, self.logprobs = n, prompt_tokens, logprobs
        self._on_event = on_event
        self._chunks: dict[int, Chunk] = {}  # index -> tokens not yet taken by the reader
        self._ends: list[Complete | Failure] = []
        self._num_complete = 0
        self._failed = False
        self._wake = asyncio.Event()

    @property
    def done(self) -> bool:
        """Every sample completed or the request failed (the producer side is finished)."""
        return self._failed or self._num_complete == self.n

    def _chunk(self, index: int) -> Chunk:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._chunks[index] = Chunk(index, prompt_tokens=self.prompt_tokens)
        return chunk

    def push_prompt(self, index: int, prompt: PromptLogprobs, cached_tokens: int) -> None:
        """The sample's prompt logprobs, complete; before any of its tokens."""
        chunk = self._chunk(index)
        assert not chunk.token_ids, "prompt logprobs after a token"
        chunk.prompt, chunk.cached_tokens = prompt, cached_tokens
        self._notify()

    def push(self, index: int, token: Token, completion_tokens: int, cached_tokens: int) -> None:
        chunk = self._chunk(index)
        chunk.token_ids.append(token.token_id)
        if self.logprobs:
            chunk.logprobs.append(token.logprob)
        chunk.top_ids.extend(token.top_ids)
        chunk.top_logprobs.extend(token.top_logprobs)
        chunk.completion_tokens, chunk.cached_tokens = completion_tokens, cached_tokens
        self._notify()

    def complete(self, end: Complete) -> None:
        assert not self.done, "complete after the stream ended"
        self._ends.append(end)
        self._num_complete += 1
        self._notify()

    def fail(self, code: int, message: str) -> None:
        if self.done:
            return
        self._failed = True
        self._ends.append(Failure(code, message))
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        if self._on_event is not None:
            self._on_event()

    def take(self) -> list[Event]:
        """Everything pending, chunks before ends (a sample's tokens precede its complete)."""
        events: list[Event] = [*self._chunks.values(), *self._ends]
        self._chunks.clear()
        self._ends.clear()
        self._wake.clear()
        return events

    async def events(self) -> AsyncIterator[Event]:
        """Yields until every sample completed or a Failure was yielded."""
        while True:
            await self._wake.wait()
            for event in self.take():
                yield event
                if isinstance(event, Failure):
                    return
            if self.done and not self._chunks and not self._ends:
                return
