"""The scheduler's connection to its executor: readiness, Info, Reset, and the ordered step stream.

`send` never blocks the loop: the Step is queued for the stream and a future for its StepResult is
returned. The stream is ordered, so results resolve the pending futures first-in first-out; that
is what lets the loop send step N+1 before N's result arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from radixserve.v1 import executor_pb2 as pb
from radixserve.v1 import executor_pb2_grpc as pb_grpc
from radixserve.v1 import grammar_pb2 as gpb
from services.common.grpc_server import insecure_channel
from services.scheduler.errors import ExecutorLost, InvalidRequest, NotReady

log = logging.getLogger("radixserve.scheduler")
COMPILE_TIMEOUT_S = 60.0  # a grammar that takes longer to compile fails its request
END_DECODE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ExecutorInfo:
    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    context_length: int
    num_kv_slots: int  # valid slots 1..num_kv_slots
    max_running_requests: int  # table rows 0..max_running_requests-1
    eos_token_ids: frozenset[int]
    max_top_logprobs: int
    dtype: str = ""
    device: str = ""
    kv_cache_dtype: str = ""
    end_decode: bool = False  # implements EndDecode

    @classmethod
    def from_pb(cls, msg: pb.InfoResponse) -> ExecutorInfo:
        return cls(
            model_name=msg.model_name,
            model_path=msg.model_path,
            architecture=msg.architecture,
            vocab_size=msg.vocab_size,
            context_length=msg.context_length,
            num_kv_slots=msg.num_kv_slots,
            max_running_requests=msg.max_running_requests,
            eos_token_ids=frozenset(msg.eos_token_ids),
            max_top_logprobs=msg.max_top_logprobs,
            dtype=msg.dtype,
            device=msg.device,
            kv_cache_dtype=msg.kv_cache_dtype,
            end_decode=msg.end_decode,
        )


class ExecutorLink(Protocol):
    """What the scheduler needs of an executor (the gRPC client, or an in-process one in tests).

    `on_lost`, when set, is called once the step stream breaks, even with nothing in flight.
    """

    on_lost: Callable[[], None] | None

    async def connect(self, timeout: float) -> ExecutorInfo: ...

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]: ...

    async def compile_grammar(self, grammar: gpb.Grammar) -> None:
        """Has the executor compile `grammar` into its cache. Raises InvalidRequest with the
        reason when it cannot be compiled, ExecutorLost when the executor does not answer."""
        ...

    def end_decode(self, step_id: int) -> None:
        """Asks the executor to end the Step `step_id` of several decode iterations after the
        iteration it computes (`Executor.EndDecode`); returns at once. Its result, when it comes,
        says how many ran. A lost request only costs the wait it was to save."""
        ...

    async def close(self) -> None: ...


class ExecutorClient:
    """gRPC ExecutorLink. `connect` waits for a warmed-up executor, resets it, opens the stream."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._outbox: asyncio.Queue[pb.Step | None] = asyncio.Queue()
        self._pending: deque[asyncio.Future[pb.StepResult]] = deque()
        self._reader: asyncio.Task | None = None
        self._broken = True
        self._stub: pb_grpc.ExecutorStub | None = None
        self._tasks: set[asyncio.Task] = set()  # EndDecode calls in flight
        self.on_lost: Callable[[], None] | None = None

    async def connect(self, timeout: float) -> ExecutorInfo:
        """Raises NotReady (executor not up in time) or ExecutorLost (the stream was refused,
        e.g. another scheduler is attached); nothing of the executor's state is touched then."""
        await self.close()
        self._channel = insecure_channel(self.address)
        stub = self._stub = pb_grpc.ExecutorStub(self._channel)
        await self._wait_ready(stub, timeout)
        info = ExecutorInfo.from_pb(await stub.Info(pb.InfoRequest()))
        self._outbox = asyncio.Queue()
        self._call = stub.Run(self._requests())
        self._broken = False
        self._reader = asyncio.create_task(self._read(self._call))
        probe = await self.send(pb.Step(step_id=0))  # an empty Step: proves the stream is ours
        if probe.HasField("error"):
            raise ExecutorLost(f"probe step rejected: {probe.error.message}")
        await stub.Reset(pb.ResetRequest())
        log.info(
            "connected to executor %s: %s, %d KV slots",
            self.address,
            info.model_name,
            info.num_kv_slots,
        )
        return info

    async def _wait_ready(self, stub: pb_grpc.ExecutorStub, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (await stub.Health(pb.HealthRequest(), timeout=2.0)).ready:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        raise NotReady(f"executor {self.address} not ready after {timeout:.0f}s")

    def send(self, step: pb.Step) -> asyncio.Future[pb.StepResult]:
        fut: asyncio.Future[pb.StepResult] = asyncio.get_running_loop().create_future()
        if self._broken:
            fut.set_exception(ExecutorLost(f"no step stream to {self.address}"))
            return fut
        self._pending.append(fut)
        self._outbox.put_nowait(step)
        return fut

    async def compile_grammar(self, grammar: gpb.Grammar) -> None:
        stub = self._stub
        if stub is None or self._broken:
            raise ExecutorLost(f"not connected to {self.address}")
        try:
            await stub.CompileGrammar(grammar, timeout=COMPILE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(exc.details() or "invalid grammar") from None
            raise ExecutorLost(f"CompileGrammar: {exc.code().name}: {exc.details()}") from None

    def end_decode(self, step_id: int) -> None:
        stub = self._stub
        if stub is None or self._broken:
            return
        task = asyncio.get_running_loop().create_task(self._end_decode(stub, step_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_decode(self, stub: pb_grpc.ExecutorStub, step_id: int) -> None:
        try:
            await stub.EndDecode(pb.EndDecodeRequest(step_id=step_id), timeout=END_DECODE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the step's result (or the stream's loss) still comes
            log.debug("EndDecode(%d): %s: %s", step_id, exc.code().name, exc.details())

    async def _requests(self):
        while (step := await self._outbox.get()) is not None:
            yield step

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        reason = "the executor closed the step stream"
        try:
            async for result in call:
                fut = self._pending.popleft()
                if not fut.done():  # the scheduler cancels what it gave up on
                    fut.set_result(result)
        except grpc.aio.AioRpcError as exc:
            reason = f"step stream failed: {exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "step stream closed"
        finally:
            self._broken = True
            while self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_exception(ExecutorLost(reason))
            if self.on_lost is not None and self._call is call:
                log.warning("executor %s: %s", self.address, reason)
                self.on_lost()

    async def close(self) -> None:
        self._broken = True
        self._outbox.put_nowait(None)
        call, self._call = self._call, None  # a deliberate close is not reported as lost
        if call is not None:
            call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        self._reader = self._channel = self._stub = None
