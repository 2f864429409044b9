"""What flows through a generation: the downstream services' answers and the gateway's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SampleEnd:
    """The scheduler finished one sample."""

    index: int
    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int  # includes a matched stop token
    cached_tokens: int
    matched_stop_token: int | None = None  # the EOS or stop token that ended it (reason "stop")


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one sample, as the scheduler streamed them."""

    index: int
    token_ids: list[int]
    logprobs: list[float]  # one per token; empty unless requested
    top_ids: list[int]  # flattened: top_logprobs ids per token, most likely first
    top_logprobs: list[float]  # same layout as top_ids
    prompt_tokens: int
    completion_tokens: int  # cumulative
    cached_tokens: int
    # The sample's end, when it arrived with these tokens (they are the sample's last).
    end: SampleEnd | None = None
    # Prompt logprobs (first chunk of sample 0 of a request that asked): positions
    # prompt_logprob_start .. prompt_tokens - 1, with top alternatives flattened as for tokens.
    prompt_logprob_start: int | None = None
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_ids: list[int] = field(default_factory=list)
    prompt_top_logprobs: list[float] = field(default_factory=list)

    @classmethod
    def ending(cls, end: SampleEnd) -> TokenChunk:
        """No new tokens, only the end (a stop token, an abort)."""
        counts = (end.prompt_tokens, end.completion_tokens, end.cached_tokens)
        return cls(end.index, [], [], [], [], *counts, end=end)


@dataclass(frozen=True)
class TextDelta:
    """The tokenizer's answer to one message of a Detokenize stream."""

    text: str
    num_tokens: int  # ids of the message consumed (fewer when a stop string matched)
    matched_stop: str | None
    finished: bool


@dataclass(frozen=True)
class TokenPiece:
    """One token shown alone: its text and its exact bytes."""

    text: str
    raw: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: TokenPiece
    logprob: float
    top: list[tuple[TokenPiece, float]]  # most likely first
    token_id: int = -1  # the token's id (-1: not known)
    top_ids: list[int] = field(default_factory=list)  # the ids of `top`, same order


@dataclass
class Output:
    """New text of one choice; the last one of a choice has `finish_reason` set, and
    `matched_stop`: the stop string or regex, or the stop token id, that ended it (None: none did)."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    # The prompt's logprobs, one per prompt token (None where there is none: the first token),
    # on the output that brought them.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )
