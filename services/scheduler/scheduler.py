"""The scheduler: waiting queue, running set, and the loop that turns them into Steps.

Threading: everything runs on one asyncio loop. The API methods (`submit`, `abort`, `load`,
`flush_cache`) are synchronous and run between the loop's awaits; `_build_step` and `_process`
never await. So no state is ever seen half-updated, and no lock is needed.

A request with a grammar waits in the queue, not admissible, while the executor compiles it
(`CompileGrammar`, awaited in a task of its own, so neither the loop nor other requests wait); a
grammar that does not compile fails the request with INVALID_ARGUMENT before it ever runs.

The loop (overlap on): build step N+1 and send it, then wait for N's result and process it — the
executor computes N+1 while the scheduler processes N. A request that finishes at N already has a
slice in N+1; its epoch has moved on, so that token is dropped, and its row is released in N+2.
With --num-continuous-decode-steps K, a step of only decodes may run K iterations (decode.py's
`continuous_steps`); once such a step is sent, the loop waits for every result before it builds
the next, so nothing queues behind the K iterations.

Failure: whatever stops `_serve` — the step stream broke, a step unanswered past --step-timeout-s,
a rejected step, a bug — fails the requests the loop holds, reports not ready, and connects again;
only cancellation ends `run`. On executor loss (broken or silent stream) the queue fails too, at
once: the executor may take minutes to come back, and a caller is better served by an error it can
retry elsewhere. A rejected step or a bug leaves the executor up, so queued requests wait for the
reconnect, which is immediate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Set
from dataclasses import replace

import grpc
from prometheus_client import CollectorRegistry

from radixserve.v1 import executor_pb2 as pb
from services.common.grammar import GrammarSpec
from services.common.tracing import tracer
from services.scheduler.batch_log import BatchLog
from services.scheduler.cache import KVCache
from services.scheduler.config import (
    SchedulerConfig,
    default_chunked_prefill_size,
    default_continuous_decode_steps,
)
from services.scheduler.decode import DecodeManager, continuous_steps
from services.scheduler.errors import (
    Busy,
    DuplicateRequest,
    ExecutorLost,
    InvalidRequest,
    NotReady,
    QueueFull,
    StepTimeout,
)
from services.scheduler.executor_client import ExecutorInfo, ExecutorLink
from services.scheduler.metrics import Counters, Load, SchedulerMetrics
from services.scheduler.policy import Policy
from services.scheduler.prefill import NewTokenRatio, PrefillManager
from services.scheduler.request import FinishReason, GenerateParams, Limits, PromptLogprobs, Req
from services.scheduler.request_table import RequestTable
from services.scheduler.shared_prefix import shared_prefixes
from services.scheduler.spans import SampleSpan
from services.scheduler.step import Step, StepResult, result_from_pb
from services.scheduler.streams import Complete, OutputStream, Token

log = logging.getLogger("radixserve.scheduler")
RECONNECT_DELAY_S = 1.0
UNAVAILABLE, INTERNAL = grpc.StatusCode.UNAVAILABLE.value[0], grpc.StatusCode.INTERNAL.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
COMPILED_MEMORY = 4096  # grammars known compiled on this connection (then the set starts over)


class StepFailed(Exception):
    """The executor rejected a Step: the scheduler's view of its state is wrong."""


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        link: ExecutorLink,
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.cfg, self.link, self.on_serving = cfg, link, on_serving
        self.registry = registry or CollectorRegistry()  # the Prometheus series (metrics.py)
        self.metrics = SchedulerMetrics(self.registry, self._scraped_load)
        self.tracer = tracer("radixserve.scheduler")  # None: tracing is off
        self.overlap = not cfg.disable_overlap_schedule
        self.counters = Counters()
        self.batch_log = BatchLog(cfg.decode_log_interval)
        self.waiting: list[Req] = []
        self.groups: dict[str, list[Req]] = {}  # request_id -> its n samples (one stream)
        self.ready = False
        self._wake = asyncio.Event()
        self._link_lost = False
        link.on_lost = self._on_link_lost
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)
        self._compiles: set[asyncio.Task] = set()
        self._compiled: set[GrammarSpec] = set()
        self._compiling: dict[GrammarSpec, asyncio.Future[None]] = {}
        self.running: list[Req] = []
        # Steps sent and not processed yet: (step, its result's future, loop time it was sent).
        self._inflight: deque[tuple[Step, asyncio.Future, float]] = deque()

    def _setup(self, info: ExecutorInfo) -> None:
        """Fresh managers sized from the executor's Info (at start and after reconnecting)."""
        cfg = self.cfg
        self.info = info
        self.metrics.bind(info.model_name)
        context = min(cfg.context_length or info.context_length, info.context_length)
        self.limits = Limits(
            info.vocab_size, context, info.num_kv_slots, info.max_top_logprobs, info.eos_token_ids
        )
        self.max_running = min(
            cfg.max_running_requests or info.max_running_requests, info.max_running_requests
        )
        self.cache = KVCache(info.num_kv_slots, cfg.disable_radix_cache, debug=cfg.debug_checks)
        self.table = RequestTable(info.max_running_requests)
        self.ratio = NewTokenRatio(cfg.schedule_conservativeness)
        policy = Policy(cfg.schedule_policy, self.cache)
        chunk = (
            default_chunked_prefill_size(info.device)
            if cfg.chunked_prefill_size is None
            else cfg.chunked_prefill_size
        )
        self.prefill = PrefillManager(
            self.cache, self.table, policy, chunk, self.max_running, self.ratio
        )
        self.decode = DecodeManager(self.cache, self._retract)
        self.decode_steps = cfg.num_continuous_decode_steps or default_continuous_decode_steps(
            info.device, info.end_decode
        )
        self.running: list[Req] = []
        self._releases: list[int] = []  # rows to release in the next step
        self._compiled = set()  # a new executor connection has an empty grammar cache
        self._inflight = deque()
        self._answered_at = 0.0  # loop time of the last step result

    # ---- API ------------------------------------------------------------------------------------

    def submit(
        self, params: GenerateParams, on_event: Callable[[], None] | None = None
    ) -> OutputStream:
        """Queues the request's n samples; raises before queuing anything if it cannot run.

        `on_event` is handed to the OutputStream (called whenever it has new events)."""
        self.require_ready()
        params.validate(self.limits)
        if params.priority and self.cfg.schedule_policy != "priority":
            raise InvalidRequest(
                f"priority {params.priority} needs --schedule-policy priority "
                f"(this scheduler uses {self.cfg.schedule_policy})"
            )
        if params.request_id in self.groups:
            raise DuplicateRequest(f"request {params.request_id!r} is already in flight")
        if len(self.waiting) + params.n > self.cfg.max_queued_requests:
            self.counters.rejections += 1
            raise QueueFull(
                f"{len(self.waiting)} requests waiting (--max-queued-requests {self.cfg.max_queued_requests})"
            )
        stream = OutputStream(params.n, len(params.input_ids), params.sampling.logprobs, on_event)
        eos = self.limits.eos_token_ids
        reqs = [Req.create(params, i, stream, eos, next(self._arrivals)) for i in range(params.n)]
        for req in reqs:
            req.jump_forward = not self.cfg.disable_jump_forward
            if self.tracer is not None:
                req.span = SampleSpan(self.tracer, req, params.traceparent)
            if req.prompt_logprobs is not None:
                self._on_prompt_logprobs(req)  # a one-token prompt has none to compute
        self.groups[params.request_id] = reqs
        self.prefill.policy.note_arrived(reqs, self.waiting)
        self.waiting.extend(reqs)
        _debug(params.request_id, "queued: %d prompt tokens, n=%d", len(params.input_ids), params.n)
        if params.grammar is not None and params.grammar not in self._compiled:
            task = asyncio.get_running_loop().create_task(self._compile(params.grammar, reqs))
            self._compiles.add(task)
            task.add_done_callback(self._compiles.discard)
        else:
            for req in reqs:
                req.grammar_ready = True
        self._end_decode_early()
        self._wake.set()
        return stream

    def _end_decode_early(self) -> None:
        """A request arrived, or every request of the last Step ended: a Step of several decode
        iterations in flight (sent when nothing waited) is asked to end after its current
        iteration, so an arrival is admitted in the next Step instead of waiting for every
        iteration, and no iteration computes only for requests that ended
        (`ExecutorLink.end_decode`)."""
        if not self._inflight:
            return
        step = self._inflight[-1][0]
        if step.decode_steps > 1 and not step.end_requested:
            step.end_requested = True
            self.link.end_decode(step.step_id)

    def abort(self, request_id: str) -> bool:
        """Ends every sample of the request now (slots freed at once, rows at the next step)."""
        samples = self.groups.get(request_id)
        if samples is None:
            return False
        _debug(request_id, "aborted by the caller")
        for req in samples:
            if req.finished is None:
                self._finish(req, FinishReason.ABORT)
        if self._inflight and all(
            r.finished is not None for r, _ in self._inflight[-1][0].samplers
        ):
            self._end_decode_early()  # a step computing only for ended requests
        self._wake.set()
        return True

    async def _compile(self, grammar: GrammarSpec, reqs: list[Req]) -> None:
        """Has the executor compile `grammar`, then makes `reqs` admissible, or fails them."""
        try:
            await asyncio.shield(self._compiling_of(grammar))
        except InvalidRequest as exc:
            self._fail_group(reqs, INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            self._fail_group(reqs, UNAVAILABLE, f"the grammar was not compiled: {exc}")
        else:
            if len(self._compiled) >= COMPILED_MEMORY:
                self._compiled.clear()
            self._compiled.add(grammar)
            for req in reqs:
                req.grammar_ready = True
        self._wake.set()

    def _compiling_of(self, grammar: GrammarSpec) -> asyncio.Future[None]:
        """The executor's compilation of `grammar`, shared by every request that waits for it."""
        fut = self._compiling.get(grammar)
        if fut is None:
            fut = asyncio.ensure_future(self.link.compile_grammar(grammar.to_pb()))
            self._compiling[grammar] = fut
            fut.add_done_callback(lambda _: self._compiling.pop(grammar, None))
        return fut

    def _fail_group(
        self, samples: list[Req], code: int, message: str, bad: Set[int] = frozenset()
    ) -> None:
        """Ends a request's samples with an error: running ones give back their slots and rows
        (caching nothing from a `bad` slot on), queued ones leave the queue; every other request
        carries on. Nothing happens when the request already ended (its group is gone or is
        another request's by now)."""
        rid = samples[0].rid
        if self.groups.get(rid) is not samples:
            return
        del self.groups[rid]
        _log_failed(rid, code, message)
        for r in samples:
            if r.finished is None:
                if r.row is not None:
                    self._release(r, bad)
                elif r in self.waiting:
                    self.waiting.remove(r)
                self._ended(r, FinishReason.ABORT, message)
        samples[0].stream.fail(code, message)

    def load(self) -> Load:
        self.require_ready()
        return Load(
            len(self.running),
            len(self.waiting),
            self.cache.stats(),
            self.ratio.value,
            self.max_running,
            self.cfg.max_queued_requests,
            replace(self.counters),
        )

    def _scraped_load(self) -> Load | None:
        """load() for a scrape from another thread: None while no executor is connected."""
        return self.load() if self.ready else None

    def flush_cache(self) -> int:
        self.require_ready()
        if self.running or self.waiting:
            raise Busy(f"{len(self.running)} running and {len(self.waiting)} waiting requests")
        return self.cache.flush()

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the executor is not connected")

    def check_integrity(self) -> None:
        """Asserts the cache's and the table's invariants: the slots themselves with
        --debug-checks (O(pool), about 20 ms over 300k slots), their counts otherwise (O(1) when
        idle, where it runs every time the queue empties)."""
        if self.cfg.debug_checks:
            self.cache.check_integrity(self.running)
        else:
            self.cache.check_counts(self.running)
        assert self.table.num_used == len(self.running), "request rows leaked"
        assert all(r.row is None and r.finished is None for r in self.waiting)
        self.counters.integrity_checks += 1

    # ---- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connects and serves until cancelled; any failure fails what it held and reconnects."""
        while True:
            try:
                self._setup(await self._connect())
                await self._set_ready(True)
                await self._serve()
            except Exception as exc:
                await self._recover(exc)

    async def _recover(self, exc: Exception) -> None:
        """Not ready; the requests the loop held fail; the link is closed for a fresh connect."""
        lost = isinstance(exc, ExecutorLost)
        if lost:
            log.error("executor lost: %s; reconnecting", exc)
        else:
            log.exception("scheduler loop stopped by %s: %s; reconnecting", type(exc).__name__, exc)
        await self._set_ready(False)
        code = UNAVAILABLE if lost else INTERNAL
        self._fail_requests(code, f"{type(exc).__name__}: {exc}", queued=lost)
        await self.link.close()
        if not lost:  # a bug that recurs at once must not spin
            await asyncio.sleep(RECONNECT_DELAY_S)

    async def _connect(self) -> ExecutorInfo:
        while True:
            try:
                return await self.link.connect(self.cfg.executor_timeout)
            except (NotReady, grpc.aio.AioRpcError, ExecutorLost) as exc:
                log.warning("executor %s: %s; retrying", self.cfg.executor, exc)
                await self.link.close()
                await asyncio.sleep(RECONNECT_DELAY_S)

    def _on_link_lost(self) -> None:
        self._link_lost = True
        self._wake.set()

    async def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.on_serving is not None:
            await self.on_serving(ready)

    async def _serve(self) -> None:
        self._link_lost = False
        self.batch_log.restart()  # after a reconnect: no rate over the time without an executor
        while True:
            if self._link_lost:
                raise ExecutorLost("the step stream closed")
            self._wake.clear()
            step = self._build_step()
            if step:
                self.counters.steps += 1
                sent_at = asyncio.get_running_loop().time()
                self._inflight.append((step, self.link.send(step.to_pb()), sent_at))
            # A multi-iteration step is never queued behind: a request that arrives meanwhile
            # waits for the iteration in progress (EndDecode), not for a second such step.
            keep = 1 if self.overlap and step and step.decode_steps == 1 else 0
            processed = len(self._inflight) > keep  # results may free memory or rows: build again
            while len(self._inflight) > keep:
                result = await self._oldest_result()
                self._process(self._inflight.popleft()[0], result)
            if not step and not processed:
                assert not self.running, "idle while requests are running"
                self.check_integrity()
                await self._wake.wait()
                self.batch_log.restart()

    async def _oldest_result(self) -> pb.StepResult:
        """The oldest in-flight step's result, or StepTimeout past --step-timeout-s.

        The executor owes it from when it was sent or the previous result came, whichever is later
        (with overlap it is sent while the step before still computes); idle time never counts, as
        nothing is in flight then."""
        step, fut, sent_at = self._inflight[0]
        timeout = self.cfg.step_timeout_s
        if timeout:
            loop = asyncio.get_running_loop()
            left = max(sent_at, self._answered_at) + timeout - loop.time()
            try:
                result = await asyncio.wait_for(asyncio.shield(fut), left)
            except TimeoutError:
                raise StepTimeout(
                    f"the executor did not answer step {step.step_id} within {timeout:g} s"
                ) from None
            self._answered_at = loop.time()
            return result
        return await fut

    def _build_step(self) -> Step:
        step = Step(next(self._step_ids))
        retractions = self.counters.retractions
        steps = 1
        if not self.waiting and self.prefill.chunked is None:
            most = self.decode_steps
            steps = continuous_steps(
                self.running, most, self.cache.available(), self.limits.context_length
            )
        if self.decode.schedule(step, self.running, steps) and step.decode_steps == 1:
            self.ratio.decay()  # a step of several iterations: by those run, in _process
        for req in self.running:
            if req.pending_write is not None:
                start, kv = req.pending_write
                step.writes.append((req.row, start, kv))
                req.pending_write = None
        admit = self.counters.retractions == retractions  # never re-admit what was just retracted
        admissible = self.waiting
        if any(not r.grammar_ready for r in admissible):
            admissible = [r for r in admissible if r.grammar_ready]
        self._start(self.prefill.schedule(step, admissible, self.running, admit))
        step.release_rows.extend(self._releases)
        self._releases = []
        by_row = {req.row: req for req in self.running}
        computed = [(by_row[s.row], s.start) for s in step.slices if s.row in by_row]
        step.shared_prefixes = shared_prefixes(computed)
        for s in step.slices:
            req = by_row[s.row]
            step.writers[s.row] = (req, req.epoch, req.kv[s.start : s.start + step.positions(s)])
        extends = [s for s in step.slices if not s.use_last_sampled]
        if extends:
            # A joining request's first slice starts where its radix-cache hit ends (also when a
            # retracted request joins again); SGLang's #running-req leaves them out.
            rows = {req.row for req in step.add}
            self.batch_log.prefill(
                len(extends),
                sum(s.length for s in extends),
                sum(s.start for s in extends if s.row in rows),
                self.cache.stats(),
                len(self.running) - len(rows),
                len(self.waiting),
            )
        return step

    def _start(self, admitted: list[Req]) -> None:
        if not admitted:
            return
        for req in admitted:
            cached = req.cached_tokens or 0
            if not req.retracted:
                self.counters.prompt_tokens += len(req.prompt)
                self.counters.cached_tokens += cached
                self.metrics.admitted(req.times)
            _debug(req.rid, "admitted sample %d (%d prompt tokens cached)", req.index, cached)
        self.running += admitted
        self.waiting = [r for r in self.waiting if r.row is None]

    def _process(self, step: Step, msg: pb.StepResult) -> None:
        if 0 < msg.decode_iterations < step.decode_steps and not msg.HasField("error"):
            self._shorten(step, msg.decode_iterations)
        top_counts = [req.sampling.top_logprobs for req, _ in step.samplers]
        result = result_from_pb(msg, top_counts, step.prompt_slices())
        if result.error is not None:
            raise StepFailed(f"step {step.step_id} rejected: {result.error[1]}")
        if step.decode_steps > 1:
            self.ratio.decay(step.decode_steps)
        self.counters.computed_tokens += result.num_tokens
        self.metrics.iteration.observe(result.num_tokens)
        # Rows whose forward failed: at once, or, over several decode iterations, at the
        # iteration where each failed, since its request may have ended before it.
        failed_at: dict[int, int] = {}  # index into the tokens -> unwritten row
        if result.unwritten and step.decode_steps == 1:
            self._drop_unwritten(step, result.unwritten)
        elif result.unwritten:
            failed_at = _first_failures(step, result)
        for row, piece in result.prompt.items():  # before the tokens: they ride in the first chunk
            req, epoch, _ = step.writers[row]
            if req.epoch == epoch and req.finished is None:
                self._on_prompt_logprobs(req, piece)
        delivered = 0  # tokens of requests still running (the decode line's throughput)
        for i, ((req, epoch), token) in enumerate(zip(step.samplers, result.tokens, strict=True)):
            if i in failed_at:
                row = failed_at[i]
                self._drop_unwritten(step, {row: result.unwritten[row]})
            elif req.epoch == epoch and req.finished is None and i in result.failed:
                self._fail_group(
                    self.groups[req.rid], INTERNAL, f"sampling failed: {result.failed[i]}"
                )
            elif req.epoch == epoch and req.finished is None:
                delivered += 1
                self._on_token(req, token, i in result.grammar_ended)
                if result.forced[i] and req.finished is None:
                    self._on_forced(req, result.forced[i])
        self.batch_log.sampled(delivered)
        if any(s.use_last_sampled for s in step.slices):
            self.batch_log.decode(
                step.decode_steps, self.cache.stats, len(self.running), len(self.waiting)
            )
        if self.cfg.debug_checks:
            self.check_integrity()

    def _shorten(self, step: Step, ran: int) -> None:
        """A Step of several decode iterations ended after `ran` (EndDecode): each of its rows
        still running gives back the slots of the positions not computed, and its next Step
        decodes from where this one stopped."""
        cut = step.decode_steps - ran
        width = len(step.slices)  # all decodes, one sampler each per iteration
        for req, epoch in step.samplers[:width]:
            if req.epoch == epoch and req.finished is None:
                self.cache.free(req.kv[-cut:])
                del req.kv[-cut:]
                req.num_computed -= cut
                req.num_scheduled_outputs -= cut
        for row, (req, epoch, kv) in step.writers.items():
            step.writers[row] = (req, epoch, kv[:ran])
        step.samplers = step.samplers[: ran * width]
        step.decode_steps = ran

    def _drop_unwritten(self, step: Step, unwritten: dict[int, str]) -> None:
        """Some slices' forward failed: their KV is garbage. Their requests fail with the cause;
        any other request holding one of those slots (a prefix it matched in the cache before
        the result came) is retracted, to be computed again from what is still valid; the cache
        drops every token from those slots on. Every other request carries on."""
        bad: set[int] = set()
        for row in unwritten:
            bad.update(step.writers[row][2])
        for row, cause in unwritten.items():
            req, epoch, _ = step.writers[row]
            if req.epoch == epoch and req.finished is None:
                log.error("request %s failed: the forward pass failed: %s", req.rid, cause)
                group = self.groups[req.rid]
                self._fail_group(group, INTERNAL, f"the forward pass failed: {cause}", bad)
        for req in [r for r in self.running if not bad.isdisjoint(r.kv)]:
            self._retract(req, bad)
        self.cache.discard(bad)

    def _on_token(self, req: Req, token: Token, grammar_ended: bool = False) -> None:
        req.output.append(token.token_id)
        self.counters.generation_tokens += 1
        n = len(req.output)
        if n == 1:
            self.metrics.first_token(req.times)
            if req.span is not None:
                req.span.first_token()
        if grammar_ended or (token.token_id in req.stop_ids and n > req.stop.min_tokens):
            self._finish(req, FinishReason.STOP, token.token_id)
            return
        req.stream.push(req.index, token, n, req.cached_tokens or 0)
        if n >= req.stop.max_tokens:
            self._finish(req, FinishReason.LENGTH)

    def _on_prompt_logprobs(self, req: Req, piece: PromptLogprobs | None = None) -> None:
        """Adds a step's values to req's prompt logprobs (they arrive in position order, once:
        a retracted request keeps what it got and computes only the rest); streams them once
        complete."""
        gathered = req.prompt_logprobs
        assert gathered is not None and not req.output, "prompt logprobs after the first token"
        if piece is not None:
            assert piece.start == gathered.start + len(gathered.logprobs), "out of order"
            gathered.logprobs += piece.logprobs
            gathered.top_ids += piece.top_ids
            gathered.top_logprobs += piece.top_logprobs
        if gathered.complete(len(req.prompt)):
            req.stream.push_prompt(req.index, gathered, req.cached_tokens or 0)
            req.prompt_logprobs = None

    def _on_forced(self, req: Req, forced: list[int]) -> None:
        """Jump-forward tokens the grammar forced after req's last token: output without a forward
        of their own. A slice of req already in flight computes the token before them and samples
        a placeholder; the epoch moves on so it is dropped, and the next slice carries them."""
        for token_id in forced:
            req.output.append(token_id)
            self.counters.generation_tokens += 1
            n = len(req.output)
            req.stream.push(req.index, Token(token_id), n, req.cached_tokens or 0)
            if n >= req.stop.max_tokens:
                self._finish(req, FinishReason.LENGTH)
                return
        req.epoch += 1
        req.num_scheduled_outputs = len(req.output)
        req.explicit_next = True

    # ---- state transitions ----------------------------------------------------------------------

    def _release(self, req: Req, bad: Set[int] = frozenset()) -> None:
        """Gives back req's slots (caching its computed tokens up to a `bad` slot) and its row
        (released next step)."""
        assert req.row is not None
        self.cache.release(req, bad)
        self.table.free_row(req.row)
        self._releases.append(req.row)
        self.running.remove(req)
        if self.prefill.chunked is req:
            self.prefill.chunked = None
        req.row, req.pending_write, req.prefill_len, req.banned = None, None, 0, False
        req.explicit_next = False
        req.num_scheduled_outputs = len(req.output)
        req.epoch += 1

    def _retract(self, req: Req, bad: Set[int] = frozenset()) -> None:
        self._release(req, bad)
        req.retracted = True
        self.waiting.append(req)
        if req.span is not None:
            req.span.retracted(req)
        self.counters.retractions += 1
        self.ratio.on_retract()
        _debug(req.rid, "retracted sample %d after %d tokens", req.index, len(req.output))

    def _finish(self, req: Req, reason: FinishReason, matched: int | None = None) -> None:
        if req.row is not None:
            self._release(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._ended(req, reason)
        _debug(
            req.rid, "finished sample %d: %s, %d tokens", req.index, reason.value, len(req.output)
        )
        req.stream.complete(
            Complete(
                req.index, reason, matched, len(req.prompt), len(req.output), req.cached_tokens or 0
            )
        )
        if all(r.finished is not None for r in self.groups[req.rid]):
            del self.groups[req.rid]

    def _ended(self, req: Req, reason: FinishReason, error: str | None = None) -> None:
        """Marks a sample ended (finished, or failed with `error`): counted, observed, its span
        closed."""
        req.finished = reason
        self.counters.finished += 1
        self.metrics.ended(req.times, len(req.prompt), len(req.output))
        if req.span is not None:
            req.span.end(req, reason.value, error)

    def _fail_requests(self, code: int, message: str, queued: bool) -> None:
        """The executor's state is gone: fail every request with a sample on it, and with `queued`
        those still waiting too (else they stay queued for the next connection)."""
        for _, fut, _ in self._inflight:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: it is the failure being handled
            fut.cancel()
        self._inflight.clear()
        for rid, samples in list(self.groups.items()):
            if queued or any(r.row is not None for r in samples):
                for req in samples:
                    if req.finished is None:
                        self._ended(req, FinishReason.ABORT, message)
                samples[0].stream.fail(code, message)
                del self.groups[rid]
                _log_failed(rid, code, message)
        self.waiting = [r for r in self.waiting if r.finished is None]
        self.running = []


def _first_failures(step: Step, result: StepResult) -> dict[int, int]:
    """For a Step of several decode iterations: index of each unwritten row's first failed
    entry in the result's tokens -> the row (the entries are iteration-major, one per slice)."""
    width = len(step.slices)
    first: dict[int, int] = {}
    for i in sorted(result.failed):
        row = step.slices[i % width].row
        if row in result.unwritten and row not in first.values():
            first[i] = row
    return first


def _debug(request_id: str, msg: str, *args: object) -> None:
    """A debug line about one request (its id in the line's `request_id`)."""
    log.debug(msg, *args, extra={"request_id": request_id})


def _log_failed(request_id: str, code: int, message: str) -> None:
    """A request ended with an error: a warning, but for a bad request (the caller's error)."""
    level = logging.DEBUG if code == INVALID_ARGUMENT else logging.WARNING
    log.log(level, "failed: %s", message, extra={"request_id": request_id})
