"""The scheduler's batch lines, as SGLang's scheduler logs them (docs/observability.md):

    Prefill batch. #new-seq: 2, #new-token: 512, #cached-token: 2000, token usage: 0.04,
        #running-req: 14, #queue-req: 3
    Decode batch. #running-req: 16, #token: 17024, token usage: 0.26,
        gen throughput (token/s): 301.12, #queue-req: 0

A "Prefill batch." line for every step that computes prompt tokens: `#new-seq` its extend
slices (a prompt split by chunked prefill counts once per chunk; a retracted request's
recomputation and a grammar's forced tokens count too), `#new-token` the tokens they compute,
`#cached-token` the radix-cache hits of the requests it adds (the positions before their
first slice; a request that joins again after a retraction, or when its min_tokens ban lifts,
counts what it has then), `#running-req` the requests running besides those (as SGLang counts
them).

A "Decode batch." line every `--decode-log-interval` decode iterations (a step of several
continuous decode iterations counts each): `#token` the KV slots held by running requests,
`#running-req` the running requests, and `gen throughput` the tokens delivered to running
requests since the line before over the seconds since it (or since the scheduler last had work
or an executor).

`token usage` is the held share of the KV slots (a cached prefix that nothing holds is
reclaimable and not counted), `#queue-req` the waiting requests. Both lines are at INFO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from services.scheduler.cache import CacheStats

log = logging.getLogger("radixserve.scheduler")


class BatchLog:
    """Writes the batch lines of one scheduler. `interval`: decode iterations between two
    "Decode batch." lines (0: none); `clock`: seconds, monotonic (a test's own)."""

    def __init__(self, interval: int, clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0:
            raise ValueError("the decode log interval must be >= 0")
        self.interval = interval
        self.clock = clock
        self._iterations = 0  # decode iterations since the last decode line
        self._tokens = 0  # tokens delivered since the last decode line
        self._since = clock()

    def prefill(
        self, seqs: int, new_tokens: int, cached: int, cache: CacheStats, running: int, queued: int
    ) -> None:
        """A step that computes `new_tokens` tokens over `seqs` extend slices, adding requests
        with `cached` tokens found in the radix cache, beside `running` requests running before
        it; `cache`: the KV slots after it was built."""
        log.info(
            "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
            "#running-req: %d, #queue-req: %d",
            seqs,
            new_tokens,
            cached,
            cache.usage,
            running,
            queued,
        )

    def restart(self) -> None:
        """Work comes after the scheduler was idle: the next decode line's throughput counts from
        now, not over the idle wait."""
        self._iterations = 0
        self._tokens = 0
        self._since = self.clock()

    def sampled(self, tokens: int) -> None:
        """Tokens a step's result delivered to running requests (prefill's first tokens too), for
        the throughput."""
        self._tokens += tokens

    def decode(
        self, iterations: int, stats: Callable[[], CacheStats], running: int, queued: int
    ) -> None:
        """A step's result that ran `iterations` decode iterations; writes a line when they
        complete an interval, with the KV slots `stats()` gives then (read only for a line)."""
        if self.interval == 0 or iterations <= 0:
            return
        self._iterations += iterations
        if self._iterations < self.interval:
            return
        cache = stats()
        now = self.clock()
        rate = self._tokens / (now - self._since) if now > self._since else 0.0
        log.info(
            "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, "
            "gen throughput (token/s): %.2f, #queue-req: %d",
            running,
            cache.used,
            cache.usage,
            rate,
            queued,
        )
        self._iterations -= self.interval  # a line every `interval` iterations on average
        self._tokens = 0
        self._since = now
