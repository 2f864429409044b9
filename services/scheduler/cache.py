"""The KV-slot allocator and the radix cache together: the only code that moves slots between them.

Ownership: every slot 1..num_slots is in exactly one place — the allocator's free list, the tree
(evictable, or protected by a lock), or a running request's own tail `req.kv[req.num_cached:]`.
Hence `free + evictable + protected + owned-by-running-requests == total`, which
`check_integrity` asserts. Slots freed here may still be read or written by steps already sent:
that is safe because the executor runs steps in order and a freed slot is only handed out to a
step built later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

from services.scheduler.allocator import SlotAllocator
from services.scheduler.radix_cache import RadixCache, TreeNode
from services.scheduler.request import Req


@dataclass(frozen=True)
class CacheStats:
    total: int
    free: int
    evictable: int
    protected: int

    @property
    def used(self) -> int:
        """Held by running requests or locked for them (neither free nor reclaimable)."""
        return self.total - self.free - self.evictable

    @property
    def usage(self) -> float:
        """`used` over all slots (0 with no slots): the KV usage of the metrics and the log."""
        return self.used / self.total if self.total else 0.0


class KVCache:
    def __init__(self, num_slots: int, disable: bool = False, debug: bool = False) -> None:
        self.allocator = SlotAllocator(num_slots, debug=debug)
        self.tree = RadixCache(disable=disable)

    @property
    def enabled(self) -> bool:
        return not self.tree.disable

    def available(self) -> int:
        """Slots an allocation can get: free plus evictable."""
        return self.allocator.num_free + self.tree.sizes()[0]

    def stats(self) -> CacheStats:
        evictable, protected = self.tree.sizes()
        return CacheStats(self.allocator.num_slots, self.allocator.num_free, evictable, protected)

    def match_len(self, ids: Sequence[int]) -> int:
        """Cached-prefix length of ids (refreshes LRU; used to order the queue)."""
        return len(self.tree.match_prefix(ids)[0])

    def allocate(self, n: int) -> list[int] | None:
        """n slots, evicting unlocked cache entries if the free list is short; None if impossible."""
        short = n - self.allocator.num_free
        if short > 0:
            self.allocator.free(self.tree.evict(short))
        if not self.allocator.can_allocate(n):
            return None
        return self.allocator.allocate(n)

    def free(self, slots: list[int]) -> None:
        """Give back slots from `allocate` that no position was computed into."""
        self.allocator.free(slots)

    # ---- a request's slots ----------------------------------------------------------------------

    def attach(self, req: Req) -> None:
        """Lock the longest cached prefix of req's matchable tokens as its first positions.

        The last token is never matched: its logits are needed to sample the next one. Nor are
        the positions whose prompt logprobs req still needs (`Req.matchable_ids`).
        """
        kv, node = self.tree.match_prefix(req.matchable_ids())
        self.tree.lock(node)
        req.kv, req.num_cached, req.node, req.num_computed = list(kv), len(kv), node, len(kv)

    def detach(self, req: Req) -> None:
        """Undo `attach` for a request that could not be admitted after all."""
        assert len(req.kv) == req.num_cached, "detach after allocating"
        self._unlock(req)

    def release(self, req: Req, bad: Set[int] = frozenset()) -> None:
        """Return everything req holds, caching the tokens whose KV is written (finish, abort,
        retraction). Slots past the known tokens (an overlapped step's input) are freed. With
        `bad` (slots whose KV a failed forward did not write), only the tokens before req's first
        bad slot are cached; bad slots the tree holds stay its own until `discard`."""
        ids = req.fill_ids
        n = min(req.num_computed, len(ids))
        if bad:
            n = next((i for i, slot in enumerate(req.kv[:n]) if slot in bad), n)
        r = self.tree.insert(ids[:n], req.kv[:n])  # the tree now owns kv[r:n]
        self.allocator.free(req.kv[req.num_cached : r])  # duplicates of cached tokens
        self.allocator.free(req.kv[max(n, req.num_cached) :])
        self._unlock(req)

    def discard(self, bad: Set[int]) -> int:
        """Drop from the tree every cached token from a bad slot on (see RadixCache.discard) and
        free those slots; every request holding them must have been released first. Returns how
        many slots were freed."""
        freed = self.tree.discard(set(bad))
        self.allocator.free(freed)
        return len(freed)

    def cache_prefix(self, req: Req) -> None:
        """Insert the computed part of a prefilling request and lock it instead of the old prefix.

        Called once the step computing those positions is fully built, so no step reads a slot
        before the step writing it. Where the tree already held some of the tokens, the request
        adopts the tree's slots: its own duplicates are freed and `req.pending_write` tells the
        next step to repoint the executor's table row before anyone reuses them.
        """
        if not self.enabled:
            return
        n, m, own = req.num_computed, req.num_cached, req.kv
        ids = req.fill_ids[:n]
        r = self.tree.insert(ids, own)
        kv, node = self.tree.match_prefix(ids)
        assert len(kv) == n, f"inserted {n} tokens but matched {len(kv)}"
        self.tree.lock(node)
        self._unlock(req)
        if r > m:
            self.allocator.free(own[m:r])
            req.pending_write = (m, kv[m:r])
        req.kv, req.num_cached, req.node, req.num_computed = kv, n, node, n

    def _unlock(self, req: Req) -> None:
        if req.node is not None:
            self.tree.unlock(req.node)
        req.kv, req.num_cached, req.node, req.num_computed = [], 0, None, 0

    # ---- maintenance ----------------------------------------------------------------------------

    def flush(self) -> int:
        """Empty the cache; only valid when no request holds slots. Returns the slots freed."""
        _, protected = self.tree.sizes()
        assert (
            protected == 0
            and self.allocator.num_free + self.tree.total_size() == self.allocator.num_slots
        )
        freed = self.tree.total_size()
        self.tree.reset()
        self.allocator.reset()
        return freed

    def reset(self) -> None:
        """Forget everything (the executor was lost): callers drop every request's slots."""
        self.tree.reset()
        self.allocator.reset()

    def check_counts(self, running: Iterable[Req]) -> None:
        """Assert that every slot is free, held by the tree or owned by a running request, by
        counts alone (O(running requests); SGLang's idle memory check): a leaked or twice-freed
        slot breaks the sum. `check_integrity` checks the slots themselves."""
        self._check_sum(sum(len(req.kv) - req.num_cached for req in running))

    def _check_sum(self, owned: int) -> None:
        """Assert free + cached + `owned` slots = the pool."""
        stats = self.stats()
        assert stats.free + stats.evictable + stats.protected + owned == stats.total, (
            f"KV slots leaked: {stats.free} free + {stats.evictable + stats.protected} cached "
            f"+ {owned} owned != {stats.total}"
        )

    def check_integrity(self, running: Iterable[Req]) -> None:
        """Assert the ownership invariant and each request's view of its slots. O(pool)."""
        self.tree.check_integrity()
        running = list(running)
        for req in running:
            self._check_request(req)
        owned = [s for req in running for s in req.kv[req.num_cached :]]
        cached = self.tree.slots()
        self.allocator.check_integrity(cached + owned)
        stats = self.stats()
        assert stats.evictable + stats.protected == len(cached)
        self._check_sum(len(owned))

    def _check_request(self, req: Req) -> None:
        assert len(req.kv) == req.num_computed, (
            f"{req.rid}: {len(req.kv)} slots, {req.num_computed} computed"
        )
        # Positions past the known tokens: those of steps in flight (one per decode iteration).
        in_flight = max(1, req.num_scheduled_outputs - len(req.output))
        assert req.num_cached <= req.num_computed <= len(req.fill_ids) + in_flight
        path = _path_slots(req.node) if req.node is not None else []
        assert path == req.kv[: req.num_cached], (
            f"{req.rid}: cached prefix differs from its tree path"
        )
        assert req.node is None or req.node is self.tree.root or req.node.lock_ref > 0


def _path_slots(node: TreeNode) -> list[int]:
    parts: list[list[int]] = []
    cur: TreeNode | None = node
    while cur is not None:
        parts.append(cur.value)
        cur = cur.parent
    return [s for part in reversed(parts) for s in part]
