"""The Tokenizer gRPC servicer: decode the message, call the tokenizer, encode the answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from opentelemetry import trace

from radixserve.v1 import tokenizer_pb2 as pb
from radixserve.v1 import tokenizer_pb2_grpc as pb_grpc
from services.common import tracing
from services.common.log import REQUEST_ID, REQUEST_ID_METADATA
from services.tokenizer import convert
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.session import DetokenizeSession
from services.tokenizer.stream import Delta, DetokenizeStream
from services.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("radixserve.tokenizer")
T = TypeVar("T")

# Encoding and chat templates run on these threads so a long prompt never stalls other streams.
ENCODE_THREADS = 2
# Token messages with more ids than this are detokenized on the threads too.
INLINE_MAX_IDS = 64


@contextlib.asynccontextmanager
async def _status(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """The one place errors become gRPC statuses."""
    try:
        yield
    except InvalidRequest as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _for_request(context: grpc.aio.ServicerContext) -> None:
    """Takes the request id the caller sent as `x-request-id` metadata (the gateway does, for
    the HTTP request it serves): sets REQUEST_ID for this call's log lines and tags the call's
    span (when tracing is on) with it. Each call runs in a task of its own, so the variable
    ends with the call."""
    rid = dict(context.invocation_metadata() or ()).get(REQUEST_ID_METADATA)
    if rid:
        REQUEST_ID.set(rid)
        trace.get_current_span().set_attribute(tracing.REQUEST_ID, rid)


class TokenizerServicer(pb_grpc.TokenizerServicer):
    """Serves one Tokenizer; UNAVAILABLE until `tokenizer` is set."""

    def __init__(self) -> None:
        self.tokenizer: Tokenizer | None = None
        self.pool = ThreadPoolExecutor(max_workers=ENCODE_THREADS, thread_name_prefix="encode")

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> Tokenizer:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the tokenizer is still loading")
        return self.tokenizer  # type: ignore[return-value]

    async def Encode(
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeResponse:
        tok = await self._require_ready(context)
        _for_request(context)
        add_special = convert.add_special_tokens_from_pb(request)
        ids = await self._off_loop(tok.encode, request.text, add_special)
        log.debug("encoded %d characters into %d tokens", len(request.text), len(ids))
        return pb.EncodeResponse(ids=ids)

    async def ApplyChatTemplate(
        self, request: pb.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyChatTemplateResponse:
        tok = await self._require_ready(context)
        _for_request(context)
        async with _status(context):
            prompt = await self._off_loop(
                tok.apply_chat_template, convert.chat_request_from_pb(request)
            )
        log.debug("rendered %d messages into %d tokens", len(request.messages), len(prompt.ids))
        return convert.chat_prompt_to_pb(prompt)

    async def Info(
        self, request: pb.TokenizerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizerInfoResponse:
        tok = await self._require_ready(context)
        return convert.info_to_pb(tok.info)

    async def Detokenize(
        self,
        request_iterator: AsyncIterator[pb.DetokenizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DetokenizeResponse]:
        tok = await self._require_ready(context)
        async with _status(context):
            stream: DetokenizeStream | None = None
            setup = pb.DetokenizeSetup()
            async for msg in request_iterator:
                if stream is None:
                    setup = _setup_of(msg)
                    stream = tok.new_detokenizer(convert.options_from_pb(setup))
                    continue
                delta = await self._detokenize(stream, _tokens_of(msg))
                yield convert.delta_to_pb(delta)
                if delta.finished:
                    rid = setup.request_id
                    log.debug(
                        "detokenized (stop %r)", delta.matched_stop, extra={"request_id": rid}
                    )
                    return

    async def DetokenizeBatch(
        self,
        request_iterator: AsyncIterator[pb.DetokenizeBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DetokenizeBatchResponse]:
        tok = await self._require_ready(context)
        session = DetokenizeSession(tok.new_detokenizer)
        async for msg in request_iterator:
            batch = convert.session_batch_from_pb(msg)
            if batch.num_ids > INLINE_MAX_IDS:
                results = await self._off_loop(session.apply, batch)
            else:
                results = session.apply(batch)
            yield convert.results_to_pb(results)

    async def ConvertIdsToTokens(
        self, request: pb.ConvertIdsToTokensRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConvertIdsToTokensResponse:
        tok = await self._require_ready(context)
        async with _status(context):
            return convert.pieces_to_pb(tok.token_pieces(list(request.ids)))

    async def _detokenize(self, stream: DetokenizeStream, msg: pb.DetokenizeTokens) -> Delta:
        step = stream.finish if msg.finish else stream.feed
        ids = list(msg.ids)
        if len(ids) > INLINE_MAX_IDS:
            return await self._off_loop(step, ids)
        return step(ids)


def _setup_of(msg: pb.DetokenizeRequest) -> pb.DetokenizeSetup:
    if msg.WhichOneof("kind") != "setup":
        raise InvalidRequest("the first Detokenize message must be a setup")
    return msg.setup


def _tokens_of(msg: pb.DetokenizeRequest) -> pb.DetokenizeTokens:
    if msg.WhichOneof("kind") != "tokens":
        raise InvalidRequest("only the first Detokenize message may be a setup")
    return msg.tokens
