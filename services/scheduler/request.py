"""A request's parameters (validated, immutable) and one sample's scheduling state (`Req`)."""

from __future__ import annotations

import enum
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.common.grammar import GrammarSpec
from services.scheduler.errors import InvalidRequest

if TYPE_CHECKING:
    from services.scheduler.radix_cache import TreeNode
    from services.scheduler.spans import SampleSpan
    from services.scheduler.streams import OutputStream


@dataclass
class SampleTimes:
    """time.monotonic() of one sample's milestones (None: not reached yet)."""

    arrived: float
    admitted: float | None = None  # first admission (a retracted sample keeps its first)
    first_token: float | None = None


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen; sent to the executor when a sample joins."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: each sample draws a random seed
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class StopOptions:
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False


@dataclass
class PromptLogprobs:
    """Logprobs of the prompt tokens from position `start` on, as the step results bring them.

    Value i is the logprob of token start + i, from the logits of position start + i - 1;
    `top_ids` / `top_logprobs` hold top_logprobs alternatives per value, flattened.
    """

    start: int  # first prompt position with a value (>= 1: token 0 has none)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)

    @property
    def next_position(self) -> int:
        """The position whose logits give the next value still missing."""
        return self.start - 1 + len(self.logprobs)

    def complete(self, prompt_len: int) -> bool:
        return self.start + len(self.logprobs) >= prompt_len


@dataclass(frozen=True)
class Limits:
    """What a request must fit; from the executor's Info and the scheduler's flags."""

    vocab_size: int
    context_length: int
    num_kv_slots: int
    max_top_logprobs: int
    eos_token_ids: frozenset[int]


@dataclass(frozen=True)
class GenerateParams:
    request_id: str
    input_ids: list[int]
    sampling: SamplingOptions = SamplingOptions()
    stop: StopOptions = StopOptions()
    n: int = 1
    grammar: GrammarSpec | None = None  # the output must follow it; None: free text
    priority: int = 0  # lower first under the `priority` policy
    traceparent: str = ""  # W3C traceparent of the caller's span ("": none)
    logprob_start_len: int = -1  # prompt logprobs from this position on; -1: none

    def validate(self, limits: Limits) -> None:
        """Raises InvalidRequest naming the first problem."""
        for ok, message in self._checks(limits):
            if not ok:
                raise InvalidRequest(message)
        self._check_length(limits)

    def _checks(self, limits: Limits) -> list[tuple[bool, str]]:
        s, st, vocab = self.sampling, self.stop, limits.vocab_size
        return [
            (bool(self.request_id), "request_id must not be empty"),
            (len(self.input_ids) > 0, "input_ids must not be empty"),
            (all(0 <= t < vocab for t in self.input_ids), f"input_ids must be in [0, {vocab})"),
            (self.n >= 1, "n must be at least 1"),
            (math.isfinite(s.temperature) and s.temperature >= 0, "temperature must be >= 0"),
            (0.0 < s.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= s.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= s.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= s.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (s.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (
                all(0 <= t < vocab for t in s.logit_bias),
                f"logit_bias token ids must be in [0, {vocab})",
            ),
            (
                all(math.isfinite(b) for b in s.logit_bias.values()),
                "logit_bias values must be finite",
            ),
            (
                0 <= s.top_logprobs <= limits.max_top_logprobs,
                f"top_logprobs must be in [0, {limits.max_top_logprobs}]",
            ),
            (st.max_tokens >= 1, "max_tokens must be at least 1"),
            (
                -1 <= self.logprob_start_len < len(self.input_ids),
                f"logprob_start_len must be -1 or in [0, {len(self.input_ids)}) "
                "(a prompt position)",
            ),
            (
                st.min_tokens <= st.max_tokens,
                f"min_tokens ({st.min_tokens}) exceeds max_tokens ({st.max_tokens})",
            ),
            (
                all(0 <= t < vocab for t in st.stop_token_ids),
                f"stop_token_ids must be in [0, {vocab})",
            ),
        ]

    def _check_length(self, limits: Limits) -> None:
        prompt, max_tokens = len(self.input_ids), self.stop.max_tokens
        if prompt + max_tokens > limits.context_length:
            raise InvalidRequest(
                f"the prompt has {prompt} tokens and max_tokens is {max_tokens}: {prompt + max_tokens} "
                f"exceeds the context length {limits.context_length}"
            )
        if prompt + max_tokens > limits.num_kv_slots:
            raise InvalidRequest(
                f"the prompt has {prompt} tokens and max_tokens is {max_tokens}: {prompt + max_tokens} "
                f"exceeds the KV cache ({limits.num_kv_slots} tokens)"
            )


@dataclass(eq=False)
class Req:
    """One sample of a GenerateRequest, from arrival to finish.

    Positions 0..len(fill_ids)-1 are prompt + output. `kv[i]` is the KV slot of position i, exactly
    what the executor's table row holds; the first `num_cached` of them belong to the radix tree
    (kept alive by the lock on `node`), the rest to this request. `len(kv) == num_computed`: slots
    are allocated when a slice is scheduled, and a scheduled slice's KV is written before any later
    step runs, so a position counts as computed once its step is sent.
    """

    rid: str  # the GenerateRequest's request_id (shared by its n samples)
    index: int  # sample index 0..n-1
    prompt: list[int]
    sampling: SamplingOptions
    stop: StopOptions
    stop_ids: frozenset[int]  # stop_token_ids, plus the model's EOS ids unless ignore_eos
    seed: int  # resolved: the request's seed + index, or random
    stream: OutputStream
    arrival: int  # FCFS order
    grammar: GrammarSpec | None = None
    priority: int = 0
    grammar_ready: bool = True  # False while the executor compiles the grammar (not admissible)
    jump_forward: bool = False  # the executor may emit the grammar's forced tokens (see decode.py)
    output: list[int] = field(default_factory=list)  # tokens seen (results processed)
    # ---- while holding a row ----
    row: int | None = None
    kv: list[int] = field(default_factory=list)
    num_cached: int = 0
    node: TreeNode | None = None
    num_computed: int = 0  # positions whose KV is scheduled
    prefill_len: int = 0  # len(fill_ids) at admission: positions to compute before decoding
    num_scheduled_outputs: int = 0  # tokens sampled once every sent step returns
    banned: bool = False  # stop tokens banned in the executor's params (min_tokens not reached)
    pending_write: tuple[int, list[int]] | None = None  # (start, slots) to rewrite in the table
    explicit_next: bool = False  # forced tokens arrived: the next slice sends them as input ids
    # Prompt logprobs asked for and not yet streamed (gathered across admissions); else None.
    prompt_logprobs: PromptLogprobs | None = None
    # ---- lifecycle ----
    epoch: int = 0  # bumped at every release; results from an older epoch are dropped
    retracted: bool = False
    cached_tokens: int | None = None  # prompt tokens from the cache at first admission
    prefix_hint: int = 0  # cached-prefix length seen by the policy this round
    overtaken: int = 0  # later arrivals admitted while this one waited (lpm aging)
    overtake_limit: int = 4  # overtaken this often, it goes first (lpm aging; Policy.note_arrived)
    finished: FinishReason | None = None
    span: SampleSpan | None = None  # with tracing on
    times: SampleTimes = field(default_factory=lambda: SampleTimes(time.monotonic()))

    @classmethod
    def create(
        cls,
        params: GenerateParams,
        index: int,
        stream: OutputStream,
        eos: frozenset[int],
        arrival: int,
    ) -> Req:
        return cls(
            rid=params.request_id,
            index=index,
            prompt=list(params.input_ids),
            sampling=params.sampling,
            stop=params.stop,
            stop_ids=stop_ids_of(params.stop, eos),
            seed=resolve_seed(params.sampling.seed, index),
            stream=stream,
            arrival=arrival,
            grammar=params.grammar,
            priority=params.priority,
            grammar_ready=params.grammar is None,
            prompt_logprobs=(
                PromptLogprobs(max(params.logprob_start_len, 1))
                if params.logprob_start_len >= 0 and index == 0
                else None
            ),
        )

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_len

    def matchable_ids(self) -> list[int]:
        """The tokens a cached prefix may cover: never the last one (its logits sample the next
        token), nor any position whose prompt logprob is still to compute (cached KV has no
        logits)."""
        ids = self.fill_ids[:-1]
        if self.prompt_logprobs is not None:
            ids = ids[: self.prompt_logprobs.next_position]
        return ids

    def prompt_logprob_span(self, start: int, end: int) -> tuple[int, int | None] | None:
        """For a prefill slice over positions start..end-1: the first position whose prompt
        logprob it returns, and the token after the slice when its last position has one too;
        None when it returns none."""
        pl = self.prompt_logprobs
        if pl is None:
            return None
        last = len(self.prompt) - 2  # the last position with a prompt token after it
        first = max(start, pl.next_position)
        if first > min(end - 1, last):
            return None
        return first, self.prompt[end] if end - 1 <= last else None

    def wants_decode(self) -> bool:
        return (
            self.row is not None
            and self.finished is None
            and not self.prefilling
            and self.num_scheduled_outputs < self.stop.max_tokens
        )

    def needs_unban(self) -> bool:
        """The next token may be a stop token, but the executor still bans them."""
        return self.banned and self.num_scheduled_outputs >= self.stop.min_tokens

    def wants_jump_forward(self) -> bool:
        """Jump-forward applies: a grammar, and nothing a forced token would need (logprobs, a
        penalty counting it, stop tokens still banned)."""
        s = self.sampling
        return (
            self.jump_forward
            and self.grammar is not None
            and not self.banned
            and not (s.logprobs or s.top_logprobs)
            and s.presence_penalty == 0.0
            and s.frequency_penalty == 0.0
            and s.repetition_penalty == 1.0
        )

    def ban_ids(self) -> frozenset[int]:
        """Ids banned while min_tokens is not reached (empty when not banned)."""
        return self.stop_ids if self.banned else frozenset()


def resolve_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return secrets.randbits(63)
    return (seed + index) & (2**64 - 1)


def stop_ids_of(stop: StopOptions, eos_token_ids: frozenset[int]) -> frozenset[int]:
    return stop.stop_token_ids if stop.ignore_eos else stop.stop_token_ids | eos_token_ids
