"""Waiting-queue order, and holding back requests whose prefix another request is computing.

- `lpm` (longest prefix match): requests with the longest cached prefix first, so cache entries are
  used before they are evicted. Matching costs O(queue × prompt), so past LPM_MAX_QUEUE waiting
  requests the order falls back to FCFS.
- `fcfs`: arrival order.
- `priority`: the request's `priority`, lowest first (vLLM's convention), then arrival order.
  Admission order only: running requests are not preempted for a higher-priority one.
Retracted requests always come first, in their original arrival order: they already streamed
tokens to a client.

Aging (`lpm`): a request may be overtaken by a bounded number of later arrivals; after that it
goes ahead of every request that arrived after it, whatever their cached prefixes. The bound is
half the requests that were waiting when it arrived (at least LPM_MIN_OVERTAKE): under FCFS it
would wait for those, so under `lpm` it waits for at most about 1.5 times as many admissions,
however many cache hits keep coming, and the cache benefit stays for everything else.

Hold-back: when a request shares at least HOLD_MIN_TOKENS not-yet-cached tokens (or its whole
uncached prompt) with a prompt being prefilled now, it waits. Once that prefill is scheduled its
tokens are in the cache, so the held request pays only for the rest (this is also how the n samples
of one request share their prompt).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from services.scheduler.cache import KVCache
from services.scheduler.radix_cache import RadixCache
from services.scheduler.request import Req

LPM_MAX_QUEUE = 128
LPM_MIN_OVERTAKE = 4
HOLD_MIN_TOKENS = 32


def _fcfs_key(req: Req) -> tuple:
    return (not req.retracted, req.arrival)


def _lpm_key(req: Req) -> tuple:
    starved = req.overtaken >= req.overtake_limit
    return (not req.retracted, not starved, -req.prefix_hint if not starved else 0, req.arrival)


def _priority_key(req: Req) -> tuple:
    return (not req.retracted, req.priority, req.arrival)


POLICIES: dict[str, Callable[[Req], tuple]] = {
    "fcfs": _fcfs_key,
    "lpm": _lpm_key,
    "priority": _priority_key,
}


class Policy:
    def __init__(self, name: str, cache: KVCache) -> None:
        assert name in POLICIES, f"unknown policy {name!r}"
        self.name, self.cache = name, cache

    def order(self, waiting: Sequence[Req]) -> list[Req]:
        """The waiting requests in the order admission should consider them."""
        if self.name == "lpm" and self.cache.enabled and len(waiting) <= LPM_MAX_QUEUE:
            for req in waiting:
                req.prefix_hint = self.cache.match_len(req.matchable_ids())
            return sorted(waiting, key=_lpm_key)
        if self.name == "priority":
            return sorted(waiting, key=_priority_key)
        return sorted(waiting, key=_fcfs_key)

    def note_arrived(self, arrived: Sequence[Req], waiting: Sequence[Req]) -> None:
        """Sets the aging bound of requests joining `waiting` (the queue before they join)."""
        limit = max(LPM_MIN_OVERTAKE, len(waiting) // 2)
        for req in arrived:
            req.overtake_limit = limit

    def note_admitted(self, admitted: Sequence[Req], waiting: Sequence[Req]) -> None:
        """Counts, for each request still waiting, the later arrivals admitted before it (only
        `lpm` reorders by anything else than arrival, so only it needs the count)."""
        if not admitted or self.name != "lpm":
            return
        arrivals = sorted(r.arrival for r in admitted)
        for req in waiting:
            if req.row is None:
                req.overtaken += len(arrivals) - bisect.bisect_right(arrivals, req.arrival)


class PrefixesInFlight:
    """Prompts being prefilled and not yet (fully) in the cache, as a throwaway radix tree.

    Built per admission round from the request in chunked prefill and each request admitted so far.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tree = RadixCache()

    def add(self, req: Req) -> None:
        if self.enabled:
            ids = req.fill_ids
            self._tree.insert(ids, ids)  # values are unused: only the keys are matched

    def should_hold(self, req: Req, cached_len: int) -> bool:
        """True when req would recompute tokens another request is computing right now."""
        if not self.enabled:
            return False
        ids = req.matchable_ids()
        shared = len(self._tree.match_prefix(ids)[0])
        extra = shared - cached_len
        return extra > 0 and extra >= min(HOLD_MIN_TOKENS, len(ids) - cached_len)
