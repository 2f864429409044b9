"""When requests are sent: Poisson arrivals, a concurrency cap, and a deadline for the whole run.

Arrivals are per workload unit: a request, or a whole conversation whose turns then follow one
another as soon as the previous answer is in. The concurrency cap counts requests in flight (a
turn waiting for a slot queues like any other request).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

from services.bench.datasets import Conversation, Request, Workload, num_requests
from services.bench.record import RequestError, RequestRecord

Send = Callable[[Request], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class Schedule:
    max_concurrency: int | None = None  # None: unbounded
    request_rate: float = math.inf  # arrivals per second; inf: all at t = 0
    timeout_s: float = 3600.0  # deadline of the run
    seed: int = 1


@dataclass
class RunResult:
    records: list[RequestRecord]  # in completion order
    start_s: float  # perf_counter at the start of the run
    duration_s: float


def arrival_offsets(count: int, rate: float, rng: random.Random) -> list[float]:
    """Seconds from the start at which each unit arrives: a Poisson process (exponential gaps),
    the first at 0."""
    if math.isinf(rate):
        return [0.0] * count
    offsets, t = [], 0.0
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


@dataclass
class Progress:
    """`completed/total` on one rewritten stderr line."""

    total: int
    stream: TextIO | None = field(default_factory=lambda: sys.stderr)
    completed: int = 0
    errors: int = 0

    def update(self, record: RequestRecord) -> None:
        self.completed += record.ok
        self.errors += not record.ok
        if self.stream is not None:
            self.stream.write(
                f"\r[bench] {self.completed}/{self.total} completed, {self.errors} errors"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


class Runner:
    """Runs a workload through `send`; every planned request ends as exactly one record."""

    def __init__(self, send: Send, schedule: Schedule, progress: Progress | None = None) -> None:
        self.send, self.schedule = send, schedule
        self.progress = progress
        self.records: list[RequestRecord] = []
        cap = schedule.max_concurrency
        self._slots: contextlib.AbstractAsyncContextManager = (
            asyncio.Semaphore(cap) if cap is not None else contextlib.nullcontext()
        )

    async def run(self, workload: Workload) -> RunResult:
        if self.progress is None:
            self.progress = Progress(num_requests(workload))
        start = time.perf_counter()
        offsets = arrival_offsets(
            len(workload), self.schedule.request_rate, random.Random(self.schedule.seed)
        )
        tasks = [
            asyncio.create_task(self._unit(u, start + o))
            for u, o in zip(workload, offsets, strict=True)
        ]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.schedule.timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        self.progress.close()
        return RunResult(self.records, start, duration)

    async def _unit(self, unit: Request | Conversation, at: float) -> None:
        answers: list[str] = []
        try:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            if isinstance(unit, Request):
                await self._send(unit)
                return
            for turn in range(len(unit.user_turns)):
                record = await self._send(unit.request(turn, answers))
                if not record.ok:
                    self._give_up(unit, turn + 1, RequestError("skipped", f"turn {turn} failed"))
                    return
                answers.append(record.text)
        except asyncio.CancelledError:
            deadline = RequestError(
                "cancelled", f"the {self.schedule.timeout_s:g} s deadline passed"
            )
            self._give_up(unit, len(answers), deadline)
            raise

    async def _send(self, request: Request) -> RequestRecord:
        async with self._slots:
            record = await self.send(request)
        self._add(record)
        return record

    def _give_up(self, unit: Request | Conversation, first_turn: int, error: RequestError) -> None:
        """Error records for the requests of `unit` from `first_turn` on, never sent or cut short
        (stamped now, with no latency: whatever they measured is lost)."""
        now = time.perf_counter()
        if isinstance(unit, Request):
            ids = [(unit.group_id, unit.conversation_id, unit.turn)]
        else:
            ids = [(0, unit.conversation_id, t) for t in range(first_turn, len(unit.user_turns))]
        for group, conversation, turn in ids:
            self._add(
                RequestRecord(group, conversation, turn, unit.output_len, start_s=now, error=error)
            )

    def _add(self, record: RequestRecord) -> None:
        self.records.append(record)
        assert self.progress is not None
        self.progress.update(record)
