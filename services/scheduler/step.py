"""A Step as the scheduler builds it, and its result; the one place executor protobufs are made.

A Step is a diff against the executor's state: rows released, then requests added, then table
writes `table[row, start:start+len] = kv`, then the slices to compute. `samplers` remembers which
request (and which of its epochs) each sampled token of the result belongs to; a slice that asks
for prompt logprobs (`logprob_start`) gets them back by row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from radixserve.v1 import executor_pb2 as pb
from services.scheduler.request import PromptLogprobs, Req
from services.scheduler.streams import Token


@dataclass
class Slice:
    row: int
    start: int  # position of the first token
    input_ids: list[int]  # empty with use_last_sampled
    use_last_sampled: bool = False
    sample: bool = True
    logprob_start: int | None = None  # prompt logprobs from this position on (None: none)
    next_token_id: int | None = None  # the token after the slice, with prompt logprobs

    @property
    def length(self) -> int:
        """Positions computed: one for a decode slice, else its input ids."""
        return 1 if self.use_last_sampled else len(self.input_ids)


@dataclass
class Step:
    step_id: int
    release_rows: list[int] = field(default_factory=list)
    add: list[Req] = field(default_factory=list)  # joining at req.row with req's current params
    writes: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (row, start, kv)
    slices: list[Slice] = field(default_factory=list)
    samplers: list[tuple[Req, int]] = field(default_factory=list)  # (req, epoch) per sampled slice
    # (length, rows): rows whose positions 0..length-1 hold the same cached slots
    shared_prefixes: list[tuple[int, list[int]]] = field(default_factory=list)
    # row -> (req, epoch, KV slots its slice writes): whose prompt logprobs or failed forward
    # a result reports
    writers: dict[int, tuple[Req, int, list[int]]] = field(default_factory=dict)
    # Decode iterations: each decode slice computes this many positions, one per iteration, and
    # `samplers` lists the decode slices once per iteration (the result's order).
    decode_steps: int = 1
    end_requested: bool = False  # EndDecode was sent for it

    def __bool__(self) -> bool:
        return bool(self.release_rows or self.add or self.writes or self.slices)

    def compute(
        self,
        req: Req,
        start: int,
        ids: list[int],
        sample: bool,
        prompt_logprobs: tuple[int, int | None] | None = None,
    ) -> None:
        """A slice of req's explicit `ids`; `prompt_logprobs`: (logprob_start, next_token_id)."""
        assert req.row is not None
        first, following = prompt_logprobs or (None, None)
        self.slices.append(
            Slice(req.row, start, ids, sample=sample, logprob_start=first, next_token_id=following)
        )
        if sample:
            self.samplers.append((req, req.epoch))

    def prompt_slices(self) -> dict[int, tuple[int, int]]:
        """row -> (prompt position of its first value, top_logprobs) of each slice with prompt
        logprobs; call once `writers` is filled."""
        return {
            s.row: (s.logprob_start + 1, self.writers[s.row][0].sampling.top_logprobs)
            for s in self.slices
            if s.logprob_start is not None
        }

    def decode(self, req: Req, start: int) -> None:
        assert req.row is not None
        self.slices.append(Slice(req.row, start, [], use_last_sampled=True))
        self.samplers.append((req, req.epoch))

    def repeat_decodes(self, k: int) -> None:
        """Makes every slice (all decodes) run `k` iterations: the executor samples each k times,
        iteration-major."""
        assert all(s.use_last_sampled for s in self.slices), "only decodes run several iterations"
        self.decode_steps = k
        self.samplers *= k

    def positions(self, s: Slice) -> int:
        """Positions slice `s` computes: its length, times the iterations for a decode."""
        return s.length * (self.decode_steps if s.use_last_sampled else 1)

    def to_pb(self) -> pb.Step:
        return pb.Step(
            step_id=self.step_id,
            release_rows=self.release_rows,
            add=[_add_to_pb(req) for req in self.add],
            writes=[pb.SlotWrite(row=r, start=s, kv_indices=kv) for r, s, kv in self.writes],
            slices=[
                pb.Slice(
                    row=s.row,
                    start=s.start,
                    input_ids=s.input_ids,
                    use_last_sampled=s.use_last_sampled,
                    sample=s.sample,
                    logprob_start=s.logprob_start,
                    next_token_id=s.next_token_id,
                )
                for s in self.slices
            ],
            shared_prefixes=[
                pb.SharedPrefix(length=n, rows=rows) for n, rows in self.shared_prefixes
            ],
            decode_steps=self.decode_steps,
        )


def _add_to_pb(req: Req) -> pb.AddRequest:
    s = req.sampling
    bias = dict(s.logit_bias)
    for t in req.ban_ids():
        bias[t] = -math.inf
    sampling = pb.SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        seed=req.seed,
        logit_bias=bias,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    # The prompt only matters to the repetition penalty; output_ids always (penalties, seed counter).
    prompt = req.prompt if s.repetition_penalty != 1.0 else []
    label = req.rid if req.stream.n == 1 else f"{req.rid}/{req.index}"
    grammar = req.grammar.to_pb() if req.grammar is not None else None
    return pb.AddRequest(
        row=req.row,
        request_id=label,
        sampling=sampling,
        prompt_ids=prompt,
        output_ids=req.output,
        grammar=grammar,
        jump_forward=req.wants_jump_forward(),
        traceparent=req.span.traceparent if req.span is not None else "",
    )


@dataclass
class StepResult:
    step_id: int
    tokens: list[Token]  # one per Step.samplers entry, in order
    grammar_ended: frozenset[int] = frozenset()  # indices into tokens: the grammar is complete
    forced: list[list[int]] = field(default_factory=list)  # per token: jump-forward tokens after it
    failed: dict[int, str] = field(default_factory=dict)  # index into tokens -> why sampling failed
    unwritten: dict[int, str] = field(default_factory=dict)  # row -> why its forward failed
    prompt: dict[int, PromptLogprobs] = field(default_factory=dict)  # row -> its slice's values
    num_tokens: int = 0
    forward_ns: int = 0
    error: tuple[int, str] | None = None  # (google.rpc code, message): the step was not applied


def result_from_pb(
    msg: pb.StepResult,
    top_counts: list[int],
    prompt_slices: dict[int, tuple[int, int]] | None = None,
) -> StepResult:
    """`top_counts[i]`: top_logprobs of the i-th sampling request (the flattened top_ids stride,
    none for an entry in `failed`);
    `prompt_slices[row]`: (position of the first value, top_logprobs) of each slice with prompt
    logprobs (`Step.prompt_slices`)."""
    if msg.HasField("error"):
        return StepResult(msg.step_id, [], error=(msg.error.code, msg.error.message))
    assert len(msg.token_ids) == len(top_counts), (
        f"step {msg.step_id}: {len(msg.token_ids)} tokens for {len(top_counts)} sampled slices"
    )
    tokens, offset = [], 0
    failed = set(msg.failed)
    for i, k in enumerate(top_counts):
        k = 0 if i in failed else k  # a failed entry is a placeholder without alternatives
        tokens.append(
            Token(
                msg.token_ids[i],
                msg.logprobs[i],
                list(msg.top_ids[offset : offset + k]),
                list(msg.top_logprobs[offset : offset + k]),
            )
        )
        offset += k
    forced: list[list[int]] = [[] for _ in tokens]
    offset = 0
    for i, count in enumerate(msg.forced_counts):
        forced[i] = list(msg.forced_ids[offset : offset + count])
        offset += count
    return StepResult(
        msg.step_id,
        tokens,
        frozenset(msg.grammar_ended),
        forced,
        dict(zip(msg.failed, msg.failed_reasons, strict=True)),
        dict(zip(msg.unwritten_rows, msg.unwritten_reasons, strict=True)),
        _prompt_from_pb(msg, prompt_slices or {}),
        msg.num_tokens,
        msg.forward_ns,
    )


def _prompt_from_pb(
    msg: pb.StepResult, slices: dict[int, tuple[int, int]]
) -> dict[int, PromptLogprobs]:
    out: dict[int, PromptLogprobs] = {}
    offset = top_offset = 0
    for row, n in zip(msg.prompt_rows, msg.prompt_counts, strict=True):
        start, top = slices[row]
        k = n * top
        out[row] = PromptLogprobs(
            start,
            list(msg.prompt_logprobs[offset : offset + n]),
            list(msg.prompt_top_ids[top_offset : top_offset + k]),
            list(msg.prompt_top_logprobs[top_offset : top_offset + k]),
        )
        offset += n
        top_offset += k
    return out
