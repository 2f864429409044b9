from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

import pytest

from services.bench.datasets import Conversation, Request
from services.bench.record import RequestError, RequestRecord
from services.bench.runner import Progress, Runner, Schedule, arrival_offsets
from services.bench.tokens import Message


def request(i: int) -> Request:
    return Request((Message("user", f"prompt {i}"),), 4, group_id=i)


class FakeSend:
    """Answers after `delay_s`; tracks how many calls overlap; fails the turns in `fail_turns`."""

    def __init__(self, delay_s: float, fail_turns: tuple[int, ...] = ()) -> None:
        self.delay_s, self.fail_turns = delay_s, fail_turns
        self.in_flight = self.peak = 0
        self.seen: list[Request] = []
        self.started: list[float] = []

    async def __call__(self, req: Request) -> RequestRecord:
        self.seen.append(req)
        self.started.append(time.perf_counter())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        record = RequestRecord(
            req.group_id, req.conversation_id, req.turn, req.output_len, latency_s=self.delay_s
        )
        if req.turn in self.fail_turns:
            record.error = RequestError("http", "no", 500)
        else:
            record.text = f"answer {req.conversation_id}.{req.turn}"
        return record


def run(workload: list, send: FakeSend, schedule: Schedule) -> tuple[list[RequestRecord], float]:
    total = sum(len(u.user_turns) if isinstance(u, Conversation) else 1 for u in workload)
    result = asyncio.run(Runner(send, schedule, Progress(total, stream=None)).run(workload))
    return result.records, result.duration_s


def test_arrivals_are_poisson() -> None:
    offsets = arrival_offsets(4000, 20.0, random.Random(0))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 20.0, rel=0.1)  # exponential: std = mean
    assert arrival_offsets(3, float("inf"), random.Random(0)) == [0.0, 0.0, 0.0]


def test_max_concurrency_caps_requests_in_flight() -> None:
    send = FakeSend(0.05)
    records, duration = run([request(i) for i in range(6)], send, Schedule(max_concurrency=2))
    assert send.peak == 2 and len(records) == 6 and all(r.ok for r in records)
    assert duration == pytest.approx(0.15, abs=0.1)


def test_unbounded_infinite_rate_sends_everything_at_once() -> None:
    send = FakeSend(0.1)
    records, _ = run([request(i) for i in range(8)], send, Schedule())
    assert send.peak == 8 and len(records) == 8


def test_request_rate_spreads_arrivals() -> None:
    send = FakeSend(0.0)
    run([request(i) for i in range(5)], send, Schedule(request_rate=20.0, seed=3))
    expected = arrival_offsets(5, 20.0, random.Random(3))
    actual = [t - send.started[0] for t in send.started]
    assert actual == pytest.approx(expected, abs=0.03)


def test_deadline_cancels_outstanding_requests_as_errors() -> None:
    send = FakeSend(5.0)
    workload = [request(0), request(1), Conversation(7, ("a", "b", "c"), 4)]
    records, duration = run(workload, send, Schedule(max_concurrency=1, timeout_s=0.2))
    assert duration < 1.0
    assert len(records) == 5 and all(r.error and r.error.kind == "cancelled" for r in records)
    assert sorted(r.turn for r in records if r.conversation_id == 7) == [0, 1, 2]


def test_conversations_run_turns_in_order_with_the_answers() -> None:
    send = FakeSend(0.02)
    workload = [Conversation(c, ("u0", "u1", "u2"), 4) for c in range(3)]
    records, _ = run(workload, send, Schedule())
    assert len(records) == 9 and all(r.ok for r in records)
    assert send.peak == 3, "conversations run concurrently, their turns one after another"
    last = [r for r in send.seen if r.turn == 2]
    for req in last:
        c = req.conversation_id
        contents = [m.content for m in req.messages]
        assert contents == ["u0", f"answer {c}.0", "u1", f"answer {c}.1", "u2"]


def test_a_failed_turn_skips_the_rest_of_its_conversation() -> None:
    send = FakeSend(0.0, fail_turns=(1,))
    records, _ = run([Conversation(0, ("u0", "u1", "u2", "u3"), 4)], send, Schedule())
    kinds = {r.turn: r.error.kind if r.error else "ok" for r in records}
    assert kinds == {0: "ok", 1: "http", 2: "skipped", 3: "skipped"}
    assert len(send.seen) == 2
