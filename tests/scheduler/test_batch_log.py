"""The scheduler's SGLang-style batch lines: a "Prefill batch." line per step that computes prompt
tokens, with the radix-cache hits of the requests it adds, and a "Decode batch." line every
--decode-log-interval decode iterations, over the checking fake executor."""

from __future__ import annotations

import asyncio
import logging
import random
import re

import pytest

from services.scheduler.batch_log import BatchLog
from services.scheduler.cache import CacheStats
from services.scheduler.config import SchedulerConfig
from tests.scheduler.fake_executor import FakeExecutor
from tests.scheduler.harness import generate, params, running_scheduler, wait_idle
from tests.scheduler.workload import Spec, random_specs, run_all

PREFILL = re.compile(
    r"Prefill batch\. #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+), "
    r"token usage: ([\d.]+), #running-req: (\d+), #queue-req: (\d+)"
)
DECODE = re.compile(
    r"Decode batch\. #running-req: (\d+), #token: (\d+), token usage: ([\d.]+), "
    r"gen throughput \(token/s\): ([\d.]+), #queue-req: (\d+)"
)


def lines(caplog: pytest.LogCaptureFixture, pattern: re.Pattern[str]) -> list[tuple[str, ...]]:
    return [m.groups() for r in caplog.records if (m := pattern.fullmatch(r.getMessage()))]


def test_prefill_lines_count_new_and_cached_tokens(caplog) -> None:
    """Two requests with the same 40-token prompt, one after the other: the first computes all
    40 tokens, the second finds 39 in the radix cache and computes one; a chunked 100-token prompt
    logs one line per chunk, its tokens adding up to the prompt, its second chunk with the
    request running (#running-req leaves out the requests a step adds, as SGLang's)."""
    prompt = list(range(1, 41))

    async def run() -> None:
        link = FakeExecutor(num_slots=512, max_rows=4)
        async with running_scheduler(
            link, chunked_prefill_size=64, num_continuous_decode_steps=1
        ) as sched:
            await generate(sched, params("a", prompt, 3))
            await generate(sched, params("b", prompt, 3))
            await generate(sched, params("c", list(range(100, 200)), 2))

    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        asyncio.run(run())
    got = [(int(a), int(b), int(c), int(r)) for a, b, c, _, r, _ in lines(caplog, PREFILL)]
    assert got == [(1, 40, 0, 0), (1, 1, 39, 0), (1, 64, 0, 0), (1, 36, 0, 1)]
    for _, _, _, usage, _, queued in lines(caplog, PREFILL):
        assert 0.0 < float(usage) <= 1.0 and int(queued) == 0


def test_prefill_lines_match_the_steps_sent_under_retractions(caplog) -> None:
    """A workload that retracts requests and admits them again: each Prefill batch line counts
    the extend slices of its Step as the executor got it, their tokens, and as cached tokens the
    positions before the slices of the requests the Step adds (a request admitted again: where
    it starts then)."""
    specs = random_specs(random.Random(9), 300, max_prompt=80, max_tokens=40)
    specs = [Spec(**{**s.__dict__, "delay": s.delay * 20}) for s in specs]
    fake = FakeExecutor(600, 32, delay=0.0005)

    async def run() -> int:
        async with running_scheduler(fake, chunked_prefill_size=64) as sched:
            await run_all(sched, specs, timeout=120)
            await wait_idle(sched)
            return sched.counters.retractions

    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        retractions = asyncio.run(run())
    assert retractions > 0
    want = []
    for step in fake.steps:
        extends = [s for s in step.slices if not s.use_last_sampled]
        if extends:
            added = {a.row for a in step.add}
            want.append(
                (
                    len(extends),
                    sum(len(s.input_ids) for s in extends),
                    sum(s.start for s in extends if s.row in added),
                )
            )
    got = [(int(a), int(b), int(c)) for a, b, c, *_ in lines(caplog, PREFILL)]
    assert got == want


def test_decode_lines_every_interval_of_iterations(caplog) -> None:
    """Two requests of 30 tokens decoding together in steps of 4 iterations: a decode line each
    time 10 more iterations have run (counted on from the line before: after 12 and 20), with
    both requests running and their KV slots held; none with an interval of 0."""

    async def run(interval: int) -> None:
        link = FakeExecutor(num_slots=512, max_rows=4)
        async with running_scheduler(
            link, decode_log_interval=interval, num_continuous_decode_steps=4
        ) as sched:
            await asyncio.gather(
                generate(sched, params("a", [1, 2, 3, 4], 30, ignore_eos=True)),
                generate(sched, params("b", [5, 6, 7, 8], 30, ignore_eos=True)),
            )

    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        asyncio.run(run(10))
    decode = lines(caplog, DECODE)
    # 29 decode iterations after the prompt's token, in steps of 4: lines after 12 and 20.
    assert len(decode) == 2, decode
    for running, token, usage, rate, queued in decode:
        assert int(running) == 2 and int(queued) == 0
        assert 8 < int(token) <= 2 * 34 and float(usage) == pytest.approx(
            int(token) / 512, abs=0.01
        )
        assert float(rate) > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        asyncio.run(run(0))
    assert lines(caplog, DECODE) == []


def test_decode_throughput_is_tokens_over_the_seconds_since_the_last_line(caplog) -> None:
    """Lines every 4 iterations, the count carried on: 2 + 3 iterations write one (1 left over),
    3 more another; the rate is the tokens since the line before over its seconds."""
    now = [100.0]
    log = BatchLog(4, clock=lambda: now[0])
    stats = CacheStats(total=1000, free=700, evictable=100, protected=50)
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        log.sampled(8)
        log.decode(2, lambda: stats, running=8, queued=1)  # 2 of 4 iterations: no line
        now[0] = 102.0
        log.sampled(8)
        log.decode(3, lambda: stats, running=8, queued=1)  # 5: a line, 1 carried
        now[0] = 103.0
        log.sampled(30)
        log.decode(3, lambda: stats, running=8, queued=0)  # 1 + 3: a line
        now[0] = 104.0
        log.sampled(6)
        log.decode(3, lambda: stats, running=8, queued=0)  # 3: none
    assert lines(caplog, DECODE) == [
        ("8", "200", "0.20", "8.00", "1"),  # 16 tokens in 2 s; 200 slots held of 1,000
        ("8", "200", "0.20", "30.00", "0"),
    ]


def test_the_scheduler_leaves_an_idle_wait_out_of_the_rate(caplog) -> None:
    """A request, then 1,000 s with nothing to do, then another: the second request's decode
    lines count from when it came, not over the wait (the clock moves 1 ms a reading)."""
    now = [0.0]

    def clock() -> float:
        now[0] += 0.001
        return now[0]

    async def run() -> None:
        link = FakeExecutor(num_slots=512, max_rows=4)
        async with running_scheduler(
            link, decode_log_interval=1, num_continuous_decode_steps=1
        ) as sched:
            sched.batch_log = BatchLog(1, clock=clock)
            await generate(sched, params("a", [1, 2, 3], 5, ignore_eos=True))
            await wait_idle(sched)
            now[0] += 1000.0
            caplog.clear()
            await generate(sched, params("b", [4, 5, 6], 5, ignore_eos=True))

    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        asyncio.run(run())
    rates = [float(rate) for _, _, _, rate, _ in lines(caplog, DECODE)]
    assert rates and min(rates) > 10, rates


def test_throughput_after_an_idle_wait_counts_from_the_restart(caplog) -> None:
    """Tokens before an idle wait, then 10 s idle: the next line counts only what came after."""
    now = [0.0]
    log = BatchLog(1, clock=lambda: now[0])
    stats = CacheStats(total=100, free=100, evictable=0, protected=0)
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        log.sampled(50)
        now[0] = 10.0
        log.restart()
        now[0] = 12.0
        log.sampled(20)
        log.decode(1, lambda: stats, running=1, queued=0)
    assert lines(caplog, DECODE) == [("1", "0", "0.00", "10.00", "0")]


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="--decode-log-interval"):
        SchedulerConfig(decode_log_interval=-1)
    with pytest.raises(ValueError):
        BatchLog(-1)
