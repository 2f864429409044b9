"""The Executor gRPC servicer: decode the message, call the engine off the event loop, encode."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import CollectorRegistry

from radixserve.v1 import executor_pb2 as pb
from radixserve.v1 import executor_pb2_grpc as pb_grpc
from radixserve.v1 import grammar_pb2 as gpb
from services.common.grammar import GrammarError, GrammarSpec
from services.common.tracing import tracer
from services.executor.engine import PreparedStep
from services.executor.factory import LoadedModel
from services.executor.metrics import ExecutorMetrics
from services.executor.spans import StepSpans
from services.executor.step import (
    StepInput,
    StepOutput,
    error_to_pb,
    output_to_pb,
    step_from_pb,
)
from services.executor.validation import StepRejected

log = logging.getLogger("radixserve.executor")
DETACH_WAIT_S = 2.0  # how long a new Run waits for the previous stream to finish detaching
WATCHDOG_EXIT_CODE = 3


class Watchdog:
    """Ends the process when one step has executed longer than `timeout_s` (0: never).

    A forward wedged in a kernel or a deadlock holds the worker thread for good while health
    still says ready; only a restart (by the orchestrator, or `radixserve serve` noticing a dead
    service) frees it. The clock runs only between `begin` and `end` — around a step's execute on
    the worker thread — so idle time, loading and warm-up never count. A daemon thread checks.
    """

    def __init__(
        self,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        exit: Callable[[int], object] = os._exit,
    ) -> None:
        self.timeout_s = timeout_s
        self._clock, self._exit = clock, exit
        self._running: tuple[int, float] | None = None  # (step id, started) while one executes

    def begin(self, step_id: int) -> None:
        self._running = (step_id, self._clock())

    def end(self) -> None:
        self._running = None

    def start(self) -> None:
        if self.timeout_s:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def check(self) -> None:
        running = self._running
        if running is None or not self.timeout_s:
            return
        step_id, started = running
        elapsed = self._clock() - started
        if elapsed > self.timeout_s:
            log.critical(
                "watchdog: step %d has executed for %.1f s (--watchdog-timeout-s %g); the forward "
                "is wedged, exiting so the executor is restarted",
                step_id,
                elapsed,
                self.timeout_s,
            )
            with contextlib.suppress(Exception):
                faulthandler.dump_traceback(all_threads=True)  # where the forward is stuck
            self._exit(WATCHDOG_EXIT_CODE)

    def _watch(self) -> None:
        interval = min(self.timeout_s / 4, 5.0)
        while True:
            time.sleep(interval)
            self.check()


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """Serves one engine. Steps are applied and computed on one worker thread, in arrival order;
    the next Step is decoded, validated and its host-side batch built on a second thread while
    the current one computes (`Engine.prepare` / `Engine.execute`). With tracing on, executed
    Steps and the rows they add are spans (see spans.py)."""

    def __init__(
        self, watchdog: Watchdog | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.watchdog = watchdog or Watchdog(0.0)
        self.metrics = ExecutorMetrics(registry or CollectorRegistry())
        step_tracer = tracer("radixserve.executor")
        self.spans = StepSpans(step_tracer) if step_tracer is not None else None
        self.loaded: LoadedModel | None = None
        self.ready = False
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.run_active = False
        self._detached = asyncio.Event()  # set whenever no Run stream is attached
        self._detached.set()

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _require_ready(self, context: grpc.aio.ServicerContext) -> LoadedModel:
        if self.loaded is None or not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        return self.loaded  # type: ignore[return-value]

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        loaded = await self._require_ready(context)
        eng = loaded.engine
        return pb.InfoResponse(
            model_name=loaded.served_name,
            model_path=str(loaded.model_path),
            architecture=eng.cfg.architecture,
            vocab_size=eng.cfg.vocab_size,
            context_length=eng.limits.context_length,
            num_kv_slots=eng.limits.num_slots,
            max_running_requests=eng.limits.max_rows,
            dtype=str(eng.dtype).removeprefix("torch."),
            device=eng.device.type,
            attention_backend=loaded.backend,
            eos_token_ids=list(eng.cfg.eos_token_ids),
            max_top_logprobs=eng.limits.max_top_logprobs,
            tp_size=loaded.tp_size,
            kv_bytes_per_token=loaded.kv_bytes_per_token,
            kv_cache_dtype=str(eng.pool.k[0].dtype).removeprefix("torch."),
            end_decode=True,
        )

    async def Warmup(
        self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WarmupResponse:
        loaded = await self._require_ready(context)
        if loaded.engine.rows:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "warm-up needs an idle executor"
            )
        started = time.perf_counter_ns()
        await self._call(loaded.engine.warmup)
        return pb.WarmupResponse(duration_ns=time.perf_counter_ns() - started)

    async def Health(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        rows = len(self.loaded.engine.rows) if self.loaded else 0
        return pb.HealthResponse(ready=self.ready, active_rows=rows)

    async def Reset(
        self, request: pb.ResetRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetResponse:
        loaded = await self._require_ready(context)
        await self._call(loaded.engine.reset)
        if self.spans is not None:
            self.spans.reset()
        return pb.ResetResponse()

    async def CompileGrammar(
        self, request: gpb.Grammar, context: grpc.aio.ServicerContext
    ) -> pb.CompileGrammarResponse:
        loaded = await self._require_ready(context)
        grammar = loaded.engine.grammar
        if grammar is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "grammars are not available")
        started = time.perf_counter_ns()
        try:
            spec = GrammarSpec.from_pb(request)
            if spec is None:
                raise GrammarError("the grammar has no kind")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.compiler, grammar.compile, spec)
        except GrammarError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid grammar: {exc}")
        return pb.CompileGrammarResponse(duration_ns=time.perf_counter_ns() - started)

    async def EndDecode(
        self, request: pb.EndDecodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EndDecodeResponse:
        loaded = await self._require_ready(context)
        loaded.engine.end_decode(request.step_id)  # read between iterations, not on the worker
        return pb.EndDecodeResponse()

    async def Run(
        self, request_iterator: AsyncIterator[pb.Step], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResult]:
        loaded = await self._require_ready(context)
        if self.run_active:
            # A scheduler that reconnects may arrive while its old stream is still detaching.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._detached.wait(), DETACH_WAIT_S)
        if self.run_active:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another scheduler is attached"
            )
        self.run_active = True
        self._detached.clear()
        pending: asyncio.Queue[pb.Step | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(request_iterator, pending))
        try:
            while (msg := await pending.get()) is not None:
                yield await self._execute(loaded, msg)
            await reader  # re-raises a failed read of the stream
        finally:
            try:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
                await self._call(loaded.engine.reset)  # a detached scheduler's rows are gone
                if self.spans is not None:
                    self.spans.reset()
            finally:
                self.run_active = False
                self._detached.set()

    async def _read(
        self, request_iterator: AsyncIterator[pb.Step], pending: asyncio.Queue[pb.Step | None]
    ) -> None:
        """Reads Steps in order into `pending` (the scheduler sends one ahead: it waits there
        while the step before computes), then None when the stream ends."""
        try:
            async for msg in request_iterator:
                pending.put_nowait(msg)
        finally:
            pending.put_nowait(None)

    async def _execute(self, loaded: LoadedModel, msg: pb.Step) -> pb.StepResult:
        started_ns = time.time_ns()
        step, result = await self._call(self._run_step, loaded, msg)
        if self.spans is not None and step is not None:
            self.spans.record(step, started_ns, result)
        self.metrics.step(result)
        return result

    def _run_step(
        self, loaded: LoadedModel, msg: pb.Step
    ) -> tuple[StepInput | None, pb.StepResult]:
        """Decodes, prepares and executes one Step on the forward thread; (the Step, its result),
        the Step None when it was rejected before executing.

        Preparing runs here, after the step before, not on a thread of its own beside the forward:
        the two would share the interpreter lock, handed back and forth at every PyTorch call of
        either. Measured through `radixserve serve` at one request, a separate preparer thread
        made each bfloat16 decode step take 33 ms against 18 ms this way."""
        prepared = _prepare(loaded, msg)
        if not isinstance(prepared, PreparedStep):
            return None, prepared
        try:
            return prepared.step, output_to_pb(self._watched_execute(loaded, prepared))
        except StepRejected as exc:
            return prepared.step, _rejected(msg.step_id, exc)
        except Exception as exc:
            return prepared.step, _failed(msg.step_id, exc)

    def _watched_execute(self, loaded: LoadedModel, item: PreparedStep) -> StepOutput:
        self.watchdog.begin(item.step.step_id)
        try:
            return loaded.engine.execute(item)
        finally:
            self.watchdog.end()


def _prepare(loaded: LoadedModel, msg: pb.Step) -> PreparedStep | pb.StepResult:
    """The prepared Step, or the error result of one that could not be prepared."""
    try:
        return loaded.engine.prepare(step_from_pb(msg))
    except StepRejected as exc:
        return _rejected(msg.step_id, exc)
    except Exception as exc:
        return _failed(msg.step_id, exc)


def _rejected(step_id: int, exc: StepRejected) -> pb.StepResult:
    log.warning("step %d rejected: %s", step_id, exc)
    return error_to_pb(step_id, grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc))


def _failed(step_id: int, exc: Exception) -> pb.StepResult:
    log.exception("step %d failed", step_id, exc_info=exc)
    return error_to_pb(step_id, grpc.StatusCode.INTERNAL.value[0], f"{type(exc).__name__}: {exc}")
