"""A Step and its result as executor-side dataclasses; the one place protobuf is converted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from radixserve.v1 import executor_pb2 as pb
from services.common.grammar import GrammarSpec
from services.executor.sampling_params import SamplingParams


@dataclass
class NewRequest:
    row: int
    request_id: str
    sampling: SamplingParams
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    grammar: GrammarSpec | None = None
    compiled: Any = None  # the grammar's xgrammar CompiledGrammar, set when the Step is prepared
    jump_forward: bool = False  # emit the grammar's forced tokens after each sampled one
    traceparent: str = ""  # W3C traceparent of the scheduler's span of the request ("": none)


@dataclass
class SlotWrite:
    row: int
    start: int
    kv_indices: list[int]


@dataclass
class Slice:
    row: int
    start: int
    input_ids: list[int]
    use_last_sampled: bool = False
    sample: bool = True
    # Prompt logprobs from this position (absolute) to the last one with a known next token.
    logprob_start: int | None = None
    next_token_id: int | None = None  # the token after the slice's last position

    @property
    def length(self) -> int:
        return 1 if self.use_last_sampled else len(self.input_ids)

    @property
    def prompt_positions(self) -> range:
        """Positions whose prompt logprob this slice returns (empty when not asked)."""
        if self.logprob_start is None:
            return range(0)
        end = self.start + self.length - (0 if self.next_token_id is not None else 1)
        return range(self.logprob_start, end)


@dataclass
class SharedPrefix:
    """Table rows whose positions 0 .. length-1 hold the same KV slots (a shared cached prefix)."""

    length: int
    rows: list[int]


@dataclass
class StepInput:
    step_id: int = 0
    release_rows: list[int] = field(default_factory=list)
    add: list[NewRequest] = field(default_factory=list)
    writes: list[SlotWrite] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    shared_prefixes: list[SharedPrefix] = field(default_factory=list)
    # Decode iterations (`Step.decode_steps` in the proto): iteration i computes every slice at
    # start + i from the token iteration i - 1 sampled; only for use_last_sampled decodes.
    decode_steps: int = 1

    def iteration(self, i: int, rows: set[int] | None = None) -> StepInput:
        """Iteration `i` >= 1 of a multi-step decode as a Step of its own: the slices (of `rows`
        only, when given) one position further per iteration, the shared spans whose rows all
        remain, nothing else."""
        keep = [s for s in self.slices if rows is None or s.row in rows]
        spans = [p for p in self.shared_prefixes if rows is None or rows.issuperset(p.rows)]
        return StepInput(
            self.step_id,
            slices=[replace(s, start=s.start + i) for s in keep],
            shared_prefixes=spans,
        )


@dataclass
class SampledToken:
    row: int
    token_id: int
    logprob: float = math.nan
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)  # jump-forward tokens following token_id


@dataclass
class PromptLogprobs:
    """Prompt logprobs of one slice: per position of `Slice.prompt_positions`, the logprob of
    its next token, and `top_logprobs` alternatives (the row's count), flattened."""

    row: int
    logprobs: list[float]
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class StepOutput:
    step_id: int
    tokens: list[SampledToken] = field(default_factory=list)
    num_tokens: int = 0
    forward_ns: int = 0
    grammar_ended: list[int] = field(default_factory=list)  # indices into tokens
    failed: dict[int, str] = field(default_factory=dict)  # index into tokens -> cause
    # row -> cause: rows whose slice's forward pass failed (their KV there is not written)
    unwritten: dict[int, str] = field(default_factory=dict)
    # per slice with logprob_start whose forward succeeded, in the Step's slice order
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    # Decode iterations run by a Step of several (fewer than its decode_steps when ended early
    # by `Engine.end_decode`); 0 for a Step of one.
    decode_iterations: int = 0


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        min_p=msg.min_p,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty,
        seed=msg.seed,
        logit_bias=dict(msg.logit_bias),
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


def sampling_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        logit_bias=p.logit_bias,
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )


def step_from_pb(msg: pb.Step) -> StepInput:
    return StepInput(
        step_id=msg.step_id,
        release_rows=list(msg.release_rows),
        add=[
            NewRequest(
                a.row,
                a.request_id,
                sampling_from_pb(a.sampling),
                list(a.prompt_ids),
                list(a.output_ids),
                GrammarSpec.from_pb(a.grammar) if a.HasField("grammar") else None,
                jump_forward=a.jump_forward,
                traceparent=a.traceparent,
            )
            for a in msg.add
        ],
        writes=[SlotWrite(w.row, w.start, list(w.kv_indices)) for w in msg.writes],
        slices=[
            Slice(
                s.row,
                s.start,
                list(s.input_ids),
                s.use_last_sampled,
                s.sample,
                s.logprob_start if s.HasField("logprob_start") else None,
                s.next_token_id if s.HasField("next_token_id") else None,
            )
            for s in msg.slices
        ],
        shared_prefixes=[SharedPrefix(p.length, list(p.rows)) for p in msg.shared_prefixes],
        decode_steps=max(1, msg.decode_steps),
    )


def step_to_pb(step: StepInput) -> pb.Step:
    return pb.Step(
        step_id=step.step_id,
        release_rows=step.release_rows,
        add=[
            pb.AddRequest(
                row=a.row,
                request_id=a.request_id,
                sampling=sampling_to_pb(a.sampling),
                prompt_ids=a.prompt_ids,
                output_ids=a.output_ids,
                grammar=a.grammar.to_pb() if a.grammar is not None else None,
                jump_forward=a.jump_forward,
                traceparent=a.traceparent,
            )
            for a in step.add
        ],
        writes=[
            pb.SlotWrite(row=w.row, start=w.start, kv_indices=w.kv_indices) for w in step.writes
        ],
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
            for s in step.slices
        ],
        shared_prefixes=[
            pb.SharedPrefix(length=p.length, rows=p.rows) for p in step.shared_prefixes
        ],
        decode_steps=step.decode_steps,
    )


def output_to_pb(out: StepOutput) -> pb.StepResult:
    result = pb.StepResult(
        step_id=out.step_id,
        num_tokens=out.num_tokens,
        forward_ns=out.forward_ns,
        grammar_ended=out.grammar_ended,
        decode_iterations=out.decode_iterations,
    )
    for t in out.tokens:
        result.rows.append(t.row)
        result.token_ids.append(t.token_id)
        result.logprobs.append(t.logprob)
        result.top_ids.extend(t.top_ids)
        result.top_logprobs.extend(t.top_logprobs)
    for index, reason in sorted(out.failed.items()):
        result.failed.append(index)
        result.failed_reasons.append(reason)
    for row, reason in sorted(out.unwritten.items()):
        result.unwritten_rows.append(row)
        result.unwritten_reasons.append(reason)
    if any(t.forced for t in out.tokens):
        for t in out.tokens:
            result.forced_counts.append(len(t.forced))
            result.forced_ids.extend(t.forced)
    for p in out.prompt_logprobs:
        result.prompt_rows.append(p.row)
        result.prompt_counts.append(len(p.logprobs))
        result.prompt_logprobs.extend(p.logprobs)
        result.prompt_top_ids.extend(p.top_ids)
        result.prompt_top_logprobs.extend(p.top_logprobs)
    return result


def error_to_pb(step_id: int, code: int, message: str) -> pb.StepResult:
    return pb.StepResult(step_id=step_id, error=pb.StepError(code=code, message=message))
