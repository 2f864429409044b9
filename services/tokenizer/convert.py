"""Protobuf ⇄ the tokenizer's dataclasses, in one place (JSON fields are parsed here too)."""

from __future__ import annotations

import json
from typing import Any

from radixserve.v1 import tokenizer_pb2 as pb
from services.tokenizer.chat import ChatMessage, ChatPrompt, ChatRequest, join_text_parts
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.session import Feed, Result, SessionBatch
from services.tokenizer.stream import Delta, DetokenizeOptions
from services.tokenizer.tokenizer import TokenizerInfo


def add_special_tokens_from_pb(msg: pb.EncodeRequest) -> bool:
    return msg.add_special_tokens if msg.HasField("add_special_tokens") else True


def chat_request_from_pb(msg: pb.ApplyChatTemplateRequest) -> ChatRequest:
    return ChatRequest(
        messages=tuple(message_from_pb(m) for m in msg.messages),
        add_generation_prompt=msg.add_generation_prompt
        if msg.HasField("add_generation_prompt")
        else True,
        continue_final_message=msg.continue_final_message,
        chat_template=msg.chat_template if msg.HasField("chat_template") else None,
        tools=tuple(_json_objects(msg.tools_json, "tools_json")),
        chat_template_kwargs=_json_object(
            msg.chat_template_kwargs_json, "chat_template_kwargs_json"
        ),
    )


def message_from_pb(msg: pb.ChatMessage) -> ChatMessage:
    if msg.parts and msg.content:
        raise InvalidRequest("a message has both content and parts; set one")
    content = join_text_parts([(p.type, p.text) for p in msg.parts]) if msg.parts else msg.content
    return ChatMessage(
        role=msg.role,
        content=content,
        name=msg.name,
        tool_call_id=msg.tool_call_id,
        tool_calls=tuple(_json_objects(msg.tool_calls_json, "tool_calls_json")),
    )


def chat_prompt_to_pb(prompt: ChatPrompt) -> pb.ApplyChatTemplateResponse:
    return pb.ApplyChatTemplateResponse(ids=prompt.ids, prompt=prompt.text)


def info_to_pb(info: TokenizerInfo) -> pb.TokenizerInfoResponse:
    return pb.TokenizerInfoResponse(
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        bos_token_id=info.bos_token_id,
        special_tokens=[pb.SpecialToken(id=i, text=text) for i, text in info.special_tokens],
        context_length=info.context_length,
        has_chat_template=info.has_chat_template,
        model_path=info.model_path,
    )


def options_from_pb(msg: pb.DetokenizeSetup) -> DetokenizeOptions:
    return DetokenizeOptions(
        skip_special_tokens=msg.skip_special_tokens
        if msg.HasField("skip_special_tokens")
        else True,
        spaces_between_special_tokens=msg.spaces_between_special_tokens,
        stop=tuple(msg.stop),
        stop_regex=tuple(msg.stop_regex),
        include_stop_str_in_output=msg.include_stop_str_in_output,
        prompt_tail_ids=tuple(msg.prompt_tail_ids),
        min_tokens=msg.min_tokens,
    )


def session_batch_from_pb(msg: pb.DetokenizeBatchRequest) -> SessionBatch:
    """A DetokenizeBatchRequest; an open with invalid options carries its error instead."""
    return SessionBatch(
        opens=[(o.sample_id, _options_or_error(o.setup)) for o in msg.open],
        feeds=[Feed(f.sample_id, list(f.ids), f.finish) for f in msg.feeds],
        closes=list(msg.close),
    )


def _options_or_error(setup: pb.DetokenizeSetup) -> DetokenizeOptions | InvalidRequest:
    try:
        return options_from_pb(setup)
    except InvalidRequest as exc:
        return exc


def results_to_pb(results: list[Result]) -> pb.DetokenizeBatchResponse:
    invalid = 3  # google.rpc.Code INVALID_ARGUMENT
    return pb.DetokenizeBatchResponse(
        results=[
            pb.DetokenizeResult(
                sample_id=sample_id, error=pb.DetokenizeError(code=invalid, message=str(out))
            )
            if isinstance(out, InvalidRequest)
            else pb.DetokenizeResult(sample_id=sample_id, delta=delta_to_pb(out))
            for sample_id, out in results
        ]
    )


def delta_to_pb(delta: Delta) -> pb.DetokenizeResponse:
    return pb.DetokenizeResponse(
        text=delta.text,
        num_tokens=delta.num_tokens,
        matched_stop=delta.matched_stop,
        finished=delta.finished,
    )


def pieces_to_pb(pieces: list[tuple[str, bytes]]) -> pb.ConvertIdsToTokensResponse:
    return pb.ConvertIdsToTokensResponse(
        tokens=[pb.TokenPiece(text=text, bytes=raw) for text, raw in pieces]
    )


def _json_objects(text: str, field: str) -> list[dict[str, Any]]:
    """A JSON array of objects; an empty string is an empty array."""
    value = _json(text, field) if text else []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidRequest(f"{field} must be a JSON array of objects")
    return value


def _json_object(text: str, field: str) -> dict[str, Any]:
    """A JSON object; an empty string is an empty object."""
    value = _json(text, field) if text else {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be a JSON object")
    return value


def _json(text: str, field: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{field} is not valid JSON: {exc}") from exc
