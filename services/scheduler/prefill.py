"""Admission and chunked prefill: which waiting requests join this step, and how much they compute.

Three limits apply per step: a token budget for prefill (`--chunked-prefill-size`), free request
rows (`--max-running-requests`), and memory. Memory counts what running requests will still need:
their remaining prefill plus their remaining max_tokens scaled by the new-token ratio (most requests
stop well before max_tokens; when that bet fails, decode retracts). A prompt longer than the budget
is chunked: one request at a time is "the chunked request" and continues first in the next steps,
while the running requests keep decoding in the same steps.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.cache import KVCache
from services.scheduler.policy import Policy, PrefixesInFlight
from services.scheduler.request import Req
from services.scheduler.request_table import RequestTable
from services.scheduler.step import Step

CLIP_MAX_NEW_TOKENS = 4096  # a request never reserves more than this many future tokens


class NewTokenRatio:
    """Share of a running request's remaining max_tokens reserved for it, in (0, 1].

    Starts at 0.7 × conservativeness, decays linearly to a floor over ~600 decode steps, and jumps
    back to 1 after a retraction (the last bet was too optimistic).
    """

    def __init__(self, conservativeness: float = 1.0) -> None:
        self.initial = min(1.0, 0.7 * conservativeness)
        self.floor = min(self.initial, 0.14 * conservativeness)
        self.step = (self.initial - self.floor) / 600
        self.value = self.initial

    def decay(self, steps: int = 1) -> None:
        """After `steps` decode iterations."""
        self.value = max(self.floor, self.value - self.step * steps)

    def on_retract(self) -> None:
        self.value = 1.0


def future_tokens(req: Req, ratio: float) -> float:
    """Slots req may still need: its remaining prefill and its expected remaining outputs."""
    outputs = max(req.num_scheduled_outputs, len(req.output))
    remaining = max(0, min(req.stop.max_tokens - outputs, CLIP_MAX_NEW_TOKENS))
    prefill = (
        max(0, len(req.fill_ids) - req.num_computed) if req.row is None or req.prefilling else 0
    )
    return prefill + remaining * ratio


class Outcome(enum.Enum):
    ADMITTED = enum.auto()
    HELD = enum.auto()  # shares a prefix being computed: try again next step
    NO_ROOM = enum.auto()  # stop admitting this step


@dataclass
class Budget:
    tokens: int  # prefill tokens left this step
    rows: int  # rows left for new requests
    reserved: float  # slots promised to running requests, beyond what they hold


class PrefillManager:
    def __init__(
        self,
        cache: KVCache,
        table: RequestTable,
        policy: Policy,
        chunk_size: int,
        max_running: int,
        ratio: NewTokenRatio,
    ) -> None:
        self.cache, self.table, self.policy = cache, table, policy
        self.chunk_size, self.max_running, self.ratio = chunk_size, max_running, ratio
        self.chunked: Req | None = None  # the request whose prompt is partly computed

    def schedule(
        self, step: Step, waiting: Sequence[Req], running: Sequence[Req], admit: bool = True
    ) -> list[Req]:
        """Adds prefill slices to `step`: the chunked request's next chunk, then (if `admit`) new
        requests. Returns the requests admitted (the caller moves them to running)."""
        budget = Budget(
            tokens=self.chunk_size,
            rows=min(self.max_running - len(running), self.table.num_free),
            reserved=sum(future_tokens(r, self.ratio.value) for r in running),
        )
        in_flight = PrefixesInFlight(self.cache.enabled)
        touched: list[Req] = []
        if self.chunked is not None:
            touched += self._continue_chunked(step, budget, in_flight)
        admitted = []
        if admit and self.chunked is None:
            admitted = self._admit(step, budget, waiting, in_flight)
            self.policy.note_admitted(admitted, waiting)
        for req in touched + admitted:
            self.cache.cache_prefix(req)
        return admitted

    def _continue_chunked(
        self, step: Step, budget: Budget, in_flight: PrefixesInFlight
    ) -> list[Req]:
        req = self.chunked
        assert req is not None and req.prefilling
        in_flight.add(req)
        n = min(req.prefill_len - req.num_computed, budget.tokens)
        slots = self.cache.allocate(n)
        if slots is None:
            return []  # decode took the memory; retry next step
        budget.tokens -= n
        budget.reserved -= n
        self._compute(step, req, slots)
        return [req]

    def _admit(
        self, step: Step, budget: Budget, waiting: Sequence[Req], in_flight: PrefixesInFlight
    ) -> list[Req]:
        admitted: list[Req] = []
        for req in self.policy.order(waiting):
            if budget.tokens <= 0 or budget.rows <= 0:
                break
            outcome = self._try_admit(step, req, budget, in_flight)
            if outcome is Outcome.NO_ROOM:
                break
            if outcome is Outcome.ADMITTED:
                admitted.append(req)
                in_flight.add(req)
                if req.prefilling:
                    self.chunked = req
                    break
        return admitted

    def _try_admit(
        self, step: Step, req: Req, budget: Budget, in_flight: PrefixesInFlight
    ) -> Outcome:
        self.cache.attach(req)
        if in_flight.should_hold(req, req.num_cached):
            self.cache.detach(req)
            return Outcome.HELD
        cost = future_tokens(req, self.ratio.value)
        n = min(len(req.fill_ids) - req.num_cached, budget.tokens)
        slots = None
        if cost <= self.cache.available() - budget.reserved:
            slots = self.cache.allocate(n)
        if slots is None:
            self.cache.detach(req)
            return Outcome.NO_ROOM
        self._join(step, req)
        budget.tokens -= n
        budget.rows -= 1
        budget.reserved += cost - n
        self._compute(step, req, slots)
        return Outcome.ADMITTED

    def _join(self, step: Step, req: Req) -> None:
        req.row = self.table.allocate_row()
        req.prefill_len = len(req.fill_ids)
        req.num_scheduled_outputs = len(req.output)
        req.banned = bool(req.stop_ids) and len(req.output) < req.stop.min_tokens
        if req.cached_tokens is None:
            req.cached_tokens = req.num_cached
        if req.span is not None:
            req.span.admitted(req)
        step.add.append(req)
        if req.num_cached:
            step.writes.append((req.row, 0, list(req.kv)))

    def _compute(self, step: Step, req: Req, slots: list[int]) -> None:
        """Schedule positions num_computed .. +len(slots) of req into `slots`."""
        assert req.row is not None
        start, end = req.num_computed, req.num_computed + len(slots)
        step.writes.append((req.row, start, slots))
        last = end == req.prefill_len
        ids = req.fill_ids[start:end]
        step.compute(req, start, ids, last, req.prompt_logprob_span(start, end))
        req.kv += slots
        req.num_computed = end
        if last:
            req.num_scheduled_outputs += 1
            if self.chunked is req:
                self.chunked = None
