"""The Scheduler gRPC servicer: decode the message, call the scheduler, encode the answer.

Errors map to status codes in one place (`rpc_errors`, via errors.status_of). Once a Generate
stream has started, failures arrive as its `error` message instead; on the multiplexed Stream
every failure, admission included, is the request's `error` event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from radixserve.v1 import scheduler_pb2 as pb
from radixserve.v1 import scheduler_pb2_grpc as pb_grpc
from services.scheduler import convert
from services.scheduler.connection import StreamConnection
from services.scheduler.errors import SchedulerError, status_of
from services.scheduler.scheduler import Scheduler


@contextlib.asynccontextmanager
async def rpc_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except SchedulerError as exc:
        await context.abort(status_of(exc), str(exc))


class SchedulerServicer(pb_grpc.SchedulerServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        async with rpc_errors(context):
            stream = self.scheduler.submit(convert.params_from_pb(request))
        try:
            async for event in stream.events():
                yield convert.event_to_pb(event)
        finally:
            if not stream.done:  # the client went away: free its slots now
                self.scheduler.abort(request.request_id)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamBatch]:
        conn = StreamConnection(self.scheduler)
        reader = asyncio.create_task(_read_requests(request_iterator, conn))
        try:
            while not (reader.done() and not conn.streams):
                await conn.wake.wait()
                batch = conn.take()
                if batch:
                    yield convert.batch_to_pb(batch)
            reader.result()  # the caller half-closed; re-raises what broke the reader
        finally:
            reader.cancel()
            conn.close()

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        return pb.AbortResponse(found=self.scheduler.abort(request.request_id))

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadResponse:
        async with rpc_errors(context):
            return convert.load_to_pb(self.scheduler.load())

    async def FlushCache(
        self, request: pb.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushCacheResponse:
        async with rpc_errors(context):
            return pb.FlushCacheResponse(tokens_freed=self.scheduler.flush_cache())

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        async with rpc_errors(context):
            s = self.scheduler
            s.require_ready()
            return convert.model_info_to_pb(
                s.info, s.limits, s.cfg, s.max_running, s.prefill.chunk_size
            )


async def _read_requests(requests: AsyncIterator[pb.StreamRequest], conn: StreamConnection) -> None:
    """Applies a Stream caller's messages until it half-closes; then wakes the writer."""
    try:
        async for msg in requests:
            if msg.WhichOneof("kind") == "abort":
                conn.abort(msg.abort.request_id)
                continue
            try:
                params = convert.params_from_pb(msg.generate)
            except SchedulerError as exc:
                conn.refuse(msg.generate.request_id, exc)
                continue
            conn.generate(params)
    finally:
        conn.wake.set()
