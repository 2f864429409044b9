"""The scheduler API's protobuf edge: GenerateRequest in; stream events, load and model info out."""

from __future__ import annotations

from radixserve.v1 import scheduler_pb2 as pb
from services.common.grammar import GrammarError, GrammarSpec
from services.scheduler.config import SchedulerConfig
from services.scheduler.errors import InvalidRequest
from services.scheduler.executor_client import ExecutorInfo
from services.scheduler.metrics import Load
from services.scheduler.request import (
    FinishReason,
    GenerateParams,
    Limits,
    SamplingOptions,
    StopOptions,
)
from services.scheduler.streams import Chunk, Complete, Event, Failure

FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def params_from_pb(msg: pb.GenerateRequest) -> GenerateParams:
    if not msg.HasField("sampling"):
        raise InvalidRequest("sampling is required (every field is explicit)")
    s = msg.sampling
    sampling = SamplingOptions(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        seed=s.seed if s.HasField("seed") else None,
        logit_bias=dict(s.logit_bias),
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
    )
    stop = StopOptions(
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        stop_token_ids=frozenset(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )
    try:
        grammar = GrammarSpec.from_pb(s.grammar) if s.HasField("grammar") else None
    except GrammarError as exc:
        raise InvalidRequest(str(exc)) from None
    return GenerateParams(
        msg.request_id,
        list(msg.input_ids),
        sampling,
        stop,
        s.n,
        grammar,
        msg.priority,
        msg.traceparent,
        msg.logprob_start_len if msg.HasField("logprob_start_len") else -1,
    )


def event_to_pb(event: Event) -> pb.GenerateResponse:
    return pb.GenerateResponse(**_event_fields(event))


def batch_to_pb(batch: list[tuple[str, Event]]) -> pb.StreamBatch:
    """(request_id, event) pairs as one StreamBatch, order kept."""
    return pb.StreamBatch(
        events=[pb.StreamEvent(request_id=rid, **_event_fields(e)) for rid, e in batch]
    )


def _event_fields(event: Event) -> dict[str, object]:
    """The `oneof event` field both GenerateResponse and StreamEvent carry."""
    if isinstance(event, Chunk):
        chunk = pb.GenerateChunk(
            index=event.index,
            token_ids=event.token_ids,
            logprobs=event.logprobs,
            top_ids=event.top_ids,
            top_logprobs=event.top_logprobs,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_tokens=event.cached_tokens,
        )
        if event.prompt is not None:
            chunk.prompt_logprob_start = event.prompt.start
            chunk.prompt_logprobs.extend(event.prompt.logprobs)
            chunk.prompt_top_ids.extend(event.prompt.top_ids)
            chunk.prompt_top_logprobs.extend(event.prompt.top_logprobs)
        return dict(chunk=chunk)
    if isinstance(event, Complete):
        return dict(
            complete=pb.GenerateComplete(
                index=event.index,
                reason=FINISH_TO_PB[event.reason],
                matched_stop_token=event.matched_stop,
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                cached_tokens=event.cached_tokens,
            )
        )
    assert isinstance(event, Failure)
    return dict(error=pb.GenerateError(code=event.code, message=event.message))


def load_to_pb(load: Load) -> pb.GetLoadResponse:
    c = load.counters
    return pb.GetLoadResponse(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        kv_slots_total=load.kv.total,
        kv_slots_used=load.kv.used,
        kv_slots_evictable=load.kv.evictable,
        kv_slots_free=load.kv.free,
        kv_cache_usage=load.kv_usage,
        prefix_cache_hit_rate=c.hit_rate,
        prompt_tokens_total=c.prompt_tokens,
        generation_tokens_total=c.generation_tokens,
        cached_tokens_total=c.cached_tokens,
        num_retractions_total=c.retractions,
        request_rejections_total=c.rejections,
        requests_finished_total=c.finished,
        steps_total=c.steps,
        computed_tokens_total=c.computed_tokens,
        integrity_checks_total=c.integrity_checks,
        new_token_ratio=load.new_token_ratio,
        max_running_requests=load.max_running_requests,
        max_queued_requests=load.max_queued_requests,
    )


def model_info_to_pb(
    info: ExecutorInfo,
    limits: Limits,
    cfg: SchedulerConfig,
    max_running: int,
    chunked_prefill_size: int,
) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        served_model_name=info.model_name,
        model_path=info.model_path,
        architecture=info.architecture,
        context_length=limits.context_length,
        vocab_size=limits.vocab_size,
        eos_token_ids=sorted(limits.eos_token_ids),
        max_running_requests=max_running,
        num_kv_slots=limits.num_kv_slots,
        max_top_logprobs=limits.max_top_logprobs,
        max_queued_requests=cfg.max_queued_requests,
        chunked_prefill_size=chunked_prefill_size,
        schedule_policy=cfg.schedule_policy,
        radix_cache_enabled=not cfg.disable_radix_cache,
        overlap_schedule_enabled=not cfg.disable_overlap_schedule,
        dtype=info.dtype,
        device=info.device,
        kv_cache_dtype=info.kv_cache_dtype,
    )
