"""gRPC clients of the tokenizer and the schedulers; failures surface as GatewayErrors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from radixserve.v1 import scheduler_pb2 as spb
from radixserve.v1 import scheduler_pb2_grpc as spb_grpc
from radixserve.v1 import tokenizer_pb2 as tpb
from radixserve.v1 import tokenizer_pb2_grpc as tpb_grpc
from services.common.grpc_server import insecure_channel
from services.common.log import REQUEST_ID, REQUEST_ID_METADATA
from services.gateway import convert
from services.gateway.detokenize_stream import DetokenizeCall, Detokenizer
from services.gateway.errors import GatewayError, Unavailable, from_rpc_error
from services.gateway.events import TokenPiece
from services.gateway.protocol import ChatCompletionRequest
from services.gateway.request_log import valid_request_id
from services.gateway.router import SchedulerLoad
from services.gateway.sampling import GenerationInput, ModelInfo
from services.gateway.scheduler_stream import RequestEvents, SchedulerStream

log = logging.getLogger("radixserve.gateway")
T = TypeVar("T")
UNARY_TIMEOUT_S = 30.0
CHECK_TIMEOUT_S = 2.0


@contextlib.contextmanager
def rpc_errors(service: str) -> Iterator[None]:
    """Turns a failed RPC into the GatewayError its status maps to."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err, service) from None


async def check_serving(channel: grpc.aio.Channel, service: str) -> None:
    """Raises Unavailable unless the grpc.health.v1 service of `channel` reports SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    with rpc_errors(service):
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unavailable(f"the {service} is not serving yet")


class TokenizerClient:
    """The tokenizer service (several addresses: round-robin per call or sample).

    Samples are detokenized over one shared DetokenizeBatch call per address (see
    detokenize_stream), opened on first use and again after it broke; with a `tracer`, each of
    its messages is a span.
    """

    def __init__(self, addresses: list[str], tracer: trace.Tracer | None = None) -> None:
        self.addresses = addresses
        self._tracer = tracer
        self._channels = [insecure_channel(a, round_robin=True) for a in addresses]
        self._stubs = [tpb_grpc.TokenizerStub(c) for c in self._channels]
        self._turn = itertools.cycle(range(len(addresses)))
        self._calls: list[DetokenizeCall | None] = [None] * len(addresses)
        self._sample_ids = itertools.count(1)
        self._pieces: dict[int, TokenPiece] = {}  # id -> piece; at most the vocabulary

    async def _unary(self, method: str, request: object) -> Any:
        """One unary call, on the next address (see `_on_any`); the request id of the HTTP
        request being served, if any, goes with it as `x-request-id` metadata, so the
        tokenizer's log lines and spans about it carry the id."""
        rid = REQUEST_ID.get()
        metadata = ((REQUEST_ID_METADATA, rid),) if rid and valid_request_id(rid) else None
        return await self._on_any(
            lambda stub: getattr(stub, method)(request, timeout=UNARY_TIMEOUT_S, metadata=metadata)
        )

    async def _on_any(self, call: Callable[[tpb_grpc.TokenizerStub], Awaitable[T]]) -> T:
        """`call` on the next address; an unavailable tokenizer is retried on each other
        address in turn (calls have no side effects)."""
        first, n = next(self._turn), len(self._stubs)
        for attempt in range(n):
            stub = self._stubs[(first + attempt) % n]
            try:
                with rpc_errors("tokenizer"):
                    return await call(stub)
            except Unavailable:
                if attempt == len(self._stubs) - 1:
                    raise
        raise AssertionError("unreachable")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        request = tpb.EncodeRequest(text=text, add_special_tokens=add_special_tokens)
        reply = await self._unary("Encode", request)
        return list(reply.ids)

    async def apply_chat_template(self, req: ChatCompletionRequest) -> list[int]:
        reply = await self._unary("ApplyChatTemplate", convert.chat_request_to_pb(req))
        return list(reply.ids)

    async def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (the tokenizer's decode), over a Detokenize call of its own, so a
        long decode never holds up the streams sharing a DetokenizeBatch call."""
        setup = tpb.DetokenizeSetup(request_id="decode", skip_special_tokens=skip_special_tokens)
        messages = [
            tpb.DetokenizeRequest(setup=setup),
            tpb.DetokenizeRequest(tokens=tpb.DetokenizeTokens(ids=ids, finish=True)),
        ]

        async def call(stub: tpb_grpc.TokenizerStub) -> str:
            replies = stub.Detokenize(iter(messages), timeout=UNARY_TIMEOUT_S)
            return "".join([reply.text async for reply in replies])

        return await self._on_any(call)

    async def model_path(self) -> str:
        """The directory the tokenizer was loaded from."""
        reply = await self._unary("Info", tpb.TokenizerInfoRequest())
        return reply.model_path

    async def token_pieces(self, ids: Iterable[int]) -> dict[int, TokenPiece]:
        """Each id's text and bytes, for logprobs (cached: a vocabulary never changes)."""
        wanted = set(ids)
        missing = sorted(wanted - self._pieces.keys())
        if missing:
            request = tpb.ConvertIdsToTokensRequest(ids=missing)
            reply = await self._unary("ConvertIdsToTokens", request)
            self._pieces.update(zip(missing, convert.pieces_from_pb(reply), strict=True))
        return {i: self._pieces[i] for i in wanted}

    async def detokenizer(
        self, inp: GenerationInput, index: int, link: trace.SpanContext | None = None
    ) -> Detokenizer:
        """Sample `index` of `inp`, opened on a shared call (with its first feed); it fails over
        to another tokenizer address if its call breaks. `link`: the generation's span, linked
        from the spans of the messages that carry the sample's feeds."""
        setup = convert.detokenize_setup_to_pb(inp, index)
        opened = self._open(setup, None)
        assert opened is not None
        call, sample_id, k = opened
        return Detokenizer(call, sample_id, setup, k, self._open, link)

    def _open(
        self, setup: tpb.DetokenizeSetup, avoid: int | None
    ) -> tuple[DetokenizeCall, int, int] | None:
        """Opens a sample on the next address other than `avoid` (None: there is no other)."""
        k = next(self._turn)
        if k == avoid:
            if len(self.addresses) == 1:
                return None
            k = next(self._turn)
        call = self._calls[k]
        if call is None or not call.alive:
            call = self._calls[k] = DetokenizeCall(self._stubs[k], self._tracer)
        sample_id = next(self._sample_ids)
        call.open(sample_id, setup)
        return call, sample_id, k

    async def check(self) -> None:
        """Raises Unavailable unless every tokenizer address is serving."""
        for address, channel in zip(self.addresses, self._channels, strict=True):
            try:
                await check_serving(channel, "tokenizer")
            except GatewayError as exc:
                raise Unavailable(f"tokenizer {address}: {exc.message}") from None

    async def close(self) -> None:
        await asyncio.gather(*(c.close_call() for c in self._calls if c is not None))
        await asyncio.gather(*(c.close() for c in self._channels))


class SchedulerClient:
    """One scheduler replica; its requests share one multiplexed Stream call."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = insecure_channel(address)
        self._stub = spb_grpc.SchedulerStub(self._channel)
        self._stream: SchedulerStream | None = None  # made on the loop, at first use

    def generate(
        self, inp: GenerationInput, timeout_s: float, traceparent: str = ""
    ) -> RequestEvents:
        """Submits the request (part of the trace `traceparent` names, if any); its events (or
        its refusal) come from the returned queue."""
        if self._stream is None:
            self._stream = SchedulerStream(self._stub)
        return self._stream.generate(convert.generate_request_to_pb(inp, traceparent), timeout_s)

    def abort_soon(self, request_id: str) -> None:
        """Sends Abort without waiting (callable while the caller is being cancelled)."""
        if self._stream is not None:
            self._stream.abort(request_id)

    async def load(self) -> SchedulerLoad:
        with rpc_errors("scheduler"):
            reply = await self._stub.GetLoad(spb.GetLoadRequest(), timeout=CHECK_TIMEOUT_S)
        return convert.load_from_pb(self.address, reply)

    async def model_info(self, served_name: str | None) -> ModelInfo:
        with rpc_errors("scheduler"):
            reply = await self._stub.GetModelInfo(
                spb.GetModelInfoRequest(), timeout=CHECK_TIMEOUT_S
            )
        return convert.model_info_from_pb(reply, served_name)

    async def flush_cache(self) -> int:
        """Empties the replica's prefix cache; returns the cached tokens freed. Raises Busy
        while it has requests in flight."""
        with rpc_errors(f"scheduler at {self.address}"):
            reply = await self._stub.FlushCache(spb.FlushCacheRequest(), timeout=UNARY_TIMEOUT_S)
        return reply.tokens_freed

    async def state(self) -> dict[str, Any]:
        """The replica's settings (GetModelInfo) and load (GetLoad), as JSON fields."""
        with rpc_errors(f"scheduler at {self.address}"):
            info = await self._stub.GetModelInfo(spb.GetModelInfoRequest(), timeout=CHECK_TIMEOUT_S)
            load = await self._stub.GetLoad(spb.GetLoadRequest(), timeout=CHECK_TIMEOUT_S)
        return convert.scheduler_state_from_pb(self.address, info, load)

    async def check(self) -> None:
        await check_serving(self._channel, f"scheduler at {self.address}")

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
        await self._channel.close()
