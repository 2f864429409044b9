"""The gateway's protobuf edge: requests to the tokenizer and schedulers out, their answers in."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.message import Message

from radixserve.v1 import scheduler_pb2 as spb
from radixserve.v1 import tokenizer_pb2 as tpb
from services.gateway.errors import GatewayError, from_status
from services.gateway.events import SampleEnd, TextDelta, TokenChunk, TokenPiece
from services.gateway.protocol import ChatCompletionRequest, ChatMessage
from services.gateway.router import SchedulerLoad
from services.gateway.sampling import GenerationInput, ModelInfo, SamplingParams, TextOptions

FINISH_REASONS = {
    spb.FINISH_REASON_STOP: "stop",
    spb.FINISH_REASON_LENGTH: "length",
    spb.FINISH_REASON_ABORT: "abort",
}
# Prompt ids handed to the detokenizer so the first output token gets its in-context spacing.
PROMPT_TAIL = 5


def sampling_to_pb(s: SamplingParams) -> spb.SamplingOptions:
    assert s.max_tokens is not None, "max_tokens is resolved against the context first"
    return spb.SamplingOptions(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        seed=s.seed,
        logit_bias=s.logit_bias,
        logprobs=s.logprobs,
        top_logprobs=s.top_logprobs,
        max_tokens=s.max_tokens,
        min_tokens=s.min_tokens,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        n=s.n,
        grammar=s.grammar.to_pb() if s.grammar is not None else None,
    )


def generate_request_to_pb(inp: GenerationInput, traceparent: str = "") -> spb.GenerateRequest:
    return spb.GenerateRequest(
        request_id=inp.request_id,
        input_ids=inp.input_ids,
        sampling=sampling_to_pb(inp.sampling),
        priority=inp.sampling.priority,
        traceparent=traceparent,
        logprob_start_len=inp.logprob_start_len,
    )


def event_from_pb(msg: spb.GenerateResponse) -> TokenChunk | SampleEnd:
    """A chunk or the end of a sample; an `error` event raises the matching GatewayError."""
    event = _event_from_pb(msg)
    if isinstance(event, GatewayError):
        raise event
    return event


def stream_event_from_pb(msg: spb.StreamEvent) -> tuple[str, TokenChunk | SampleEnd | GatewayError]:
    """(request_id, event) of a StreamBatch; an `error` event is returned as its GatewayError."""
    return msg.request_id, _event_from_pb(msg)


def _event_from_pb(
    msg: spb.GenerateResponse | spb.StreamEvent,
) -> TokenChunk | SampleEnd | GatewayError:
    kind = msg.WhichOneof("event")
    if kind == "chunk":
        c = msg.chunk
        return TokenChunk(
            index=c.index,
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            top_ids=list(c.top_ids),
            top_logprobs=list(c.top_logprobs),
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
            prompt_logprob_start=(
                c.prompt_logprob_start if c.HasField("prompt_logprob_start") else None
            ),
            prompt_logprobs=list(c.prompt_logprobs),
            prompt_top_ids=list(c.prompt_top_ids),
            prompt_top_logprobs=list(c.prompt_top_logprobs),
        )
    if kind == "complete":
        e = msg.complete
        return SampleEnd(
            index=e.index,
            reason=FINISH_REASONS.get(e.reason, "abort"),
            prompt_tokens=e.prompt_tokens,
            completion_tokens=e.completion_tokens,
            cached_tokens=e.cached_tokens,
            matched_stop_token=e.matched_stop_token if e.HasField("matched_stop_token") else None,
        )
    return from_status(msg.error.code, msg.error.message, "scheduler")


def load_from_pb(address: str, msg: spb.GetLoadResponse) -> SchedulerLoad:
    return SchedulerLoad(
        address=address,
        num_running=msg.num_running,
        num_waiting=msg.num_waiting,
        kv_slots_total=msg.kv_slots_total,
        kv_slots_used=msg.kv_slots_used,
        max_running_requests=msg.max_running_requests,
    )


def model_info_from_pb(msg: spb.GetModelInfoResponse, served_name: str | None) -> ModelInfo:
    return ModelInfo(
        name=served_name or msg.served_model_name,
        context_length=msg.context_length,
        vocab_size=msg.vocab_size,
        max_top_logprobs=msg.max_top_logprobs,
        num_kv_slots=msg.num_kv_slots,
        architecture=msg.architecture,
        model_path=msg.model_path,
    )


def scheduler_state_from_pb(
    address: str, info: spb.GetModelInfoResponse, load: spb.GetLoadResponse
) -> dict[str, Any]:
    """One scheduler's settings and load as JSON fields, named as in the proto (for
    /get_server_info; the proto's comments document them)."""
    return {"address": address, **_fields(info), **_fields(load)}


def _fields(msg: Message) -> dict[str, Any]:
    """A flat message's fields by name; repeated fields as lists."""
    values = ((f.name, getattr(msg, f.name)) for f in msg.DESCRIPTOR.fields)
    return {name: v if isinstance(v, str | int | float) else list(v) for name, v in values}


def chat_request_to_pb(req: ChatCompletionRequest) -> tpb.ApplyChatTemplateRequest:
    return tpb.ApplyChatTemplateRequest(
        messages=[message_to_pb(m) for m in req.messages],
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools_json=json.dumps(tools) if (tools := req.tool_dicts()) else "",
        chat_template_kwargs_json=json.dumps(req.chat_template_kwargs)
        if req.chat_template_kwargs
        else "",
    )


def message_to_pb(m: ChatMessage) -> tpb.ChatMessage:
    msg = tpb.ChatMessage(
        role=m.role,
        name=m.name or "",
        tool_call_id=m.tool_call_id or "",
        tool_calls_json=json.dumps(m.tool_calls) if m.tool_calls else "",
    )
    if isinstance(m.content, str):
        msg.content = m.content
    elif m.content:
        msg.parts.extend(tpb.ContentPart(type=p.type, text=p.text or "") for p in m.content)
    return msg


def detokenize_setup_to_pb(inp: GenerationInput, index: int) -> tpb.DetokenizeSetup:
    opts: TextOptions = inp.text
    return tpb.DetokenizeSetup(
        request_id=f"{inp.request_id}/{index}",
        skip_special_tokens=opts.skip_special_tokens,
        stop=opts.stop,
        stop_regex=opts.stop_regex,
        include_stop_str_in_output=opts.include_stop_str_in_output,
        prompt_tail_ids=inp.input_ids[-PROMPT_TAIL:],
        min_tokens=inp.sampling.min_tokens,
    )


def delta_from_pb(msg: tpb.DetokenizeResponse) -> TextDelta:
    stop = msg.matched_stop if msg.HasField("matched_stop") else None
    return TextDelta(msg.text, msg.num_tokens, stop, msg.finished)


def pieces_from_pb(msg: tpb.ConvertIdsToTokensResponse) -> list[TokenPiece]:
    return [TokenPiece(t.text, t.bytes) for t in msg.tokens]
