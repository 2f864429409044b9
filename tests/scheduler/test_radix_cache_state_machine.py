"""Random request lifecycles over SlotAllocator + RadixCache, checked against a reference model.

The harness plays the scheduler: a request matches and locks its cached prefix, allocates slots for
the rest (evicting when short), may decode more tokens or cache its progress mid-flight (chunked
prefill), and on finish inserts everything, frees the duplicate overlap and unlocks. The model maps
every cached token prefix (a tuple) to the KV slot of its last token.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.scheduler.allocator import SlotAllocator
from services.scheduler.radix_cache import RadixCache, TreeNode

NUM_SLOTS = 40
TOKEN = st.integers(0, 3)  # a small alphabet, so prefixes are shared often
TOKENS = st.lists(TOKEN, min_size=1, max_size=10)
Prefix = tuple[int, ...]


@dataclass
class Req:
    ids: list[int]
    kv: list[int]  # kv[:matched] are the tree's (locked through node); kv[matched:] are ours
    matched: int
    node: TreeNode


@dataclass
class Pin:
    prefix: list[int]  # the tokens the locked node covers
    node: TreeNode


def tree_map(node: TreeNode, prefix: Prefix = ()) -> dict[Prefix, int]:
    out: dict[Prefix, int] = {}
    for child in node.children.values():
        path = prefix
        for token, slot in zip(child.key, child.value, strict=True):
            path = (*path, token)
            out[path] = slot
        out.update(tree_map(child, path))
    return out


def unlocked_leaves(node: TreeNode) -> list[TreeNode]:
    if not node.children:
        return [node] if node.lock_ref == 0 and node.parent is not None else []
    return [leaf for child in node.children.values() for leaf in unlocked_leaves(child)]


class RadixCacheMachine(RuleBasedStateMachine):
    disable = False

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlotAllocator(NUM_SLOTS, debug=True)
        self.cache = RadixCache(disable=self.disable)
        self.running: list[Req] = []
        self.pins: list[Pin] = []
        self.model: dict[Prefix, int] = {}

    # ---- harness helpers (what the scheduler does) -------------------------------------------

    def make_room(self, need: int) -> bool:
        short = need - self.alloc.num_free
        if short > 0:
            self.give_back(self.cache.evict(short))
        return self.alloc.can_allocate(need)

    def give_back(self, freed: list[int]) -> None:
        freed_set = set(freed)
        assert len(freed_set) == len(freed)
        for req in self.running:
            assert freed_set.isdisjoint(req.kv), "evicted a slot a running request uses"
        assert freed_set <= set(self.model.values())
        self.model = {p: s for p, s in self.model.items() if s not in freed_set}
        self.alloc.free(freed)

    def check_match(self, ids: list[int], kv: list[int]) -> None:
        if self.disable:
            assert kv == []
            return
        for j, slot in enumerate(kv):
            assert self.model[tuple(ids[: j + 1])] == slot
        assert len(kv) == len(ids) or tuple(ids[: len(kv) + 1]) not in self.model

    def insert(self, ids: list[int], kv: list[int], matched: int) -> int:
        """Insert, free the caller-owned duplicate overlap kv[matched:r], update the model."""
        r = self.cache.insert(ids, kv)
        assert matched <= r <= len(ids)
        self.alloc.free(kv[matched:r])
        if self.disable:
            assert r == len(ids)
            return r
        for j in range(len(ids)):
            prefix = tuple(ids[: j + 1])
            if j < r:
                assert prefix in self.model
                assert j >= matched or self.model[prefix] == kv[j]
            else:
                assert prefix not in self.model
                self.model[prefix] = kv[j]
        return r

    def pick(self, data: st.DataObject, items: list) -> int:
        return data.draw(st.integers(0, len(items) - 1))

    # ---- rules -------------------------------------------------------------------------------

    @rule(ids=TOKENS)
    def start_request(self, ids: list[int]) -> None:
        kv, node = self.cache.match_prefix(ids)
        self.check_match(ids, kv)
        self.cache.lock(node)  # before evicting, so our own prefix stays
        need = len(ids) - len(kv)
        if not self.make_room(need):
            self.cache.unlock(node)
            return
        self.running.append(Req(list(ids), kv + self.alloc.allocate(need), len(kv), node))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), new=st.lists(TOKEN, min_size=1, max_size=3))
    def decode(self, data: st.DataObject, new: list[int]) -> None:
        req = self.running[self.pick(data, self.running)]
        if self.make_room(len(new)):
            req.ids += new
            req.kv += self.alloc.allocate(len(new))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        req = self.running.pop(self.pick(data, self.running))
        self.insert(req.ids, req.kv, req.matched)
        self.cache.unlock(req.node)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def cache_unfinished_request(self, data: st.DataObject) -> None:
        """Chunked prefill: cache the progress, then hold the tree's copy instead of ours."""
        req = self.running[self.pick(data, self.running)]
        if self.disable:
            return  # nothing to cache: the request keeps owning every slot it has
        r = self.insert(req.ids, req.kv, req.matched)
        kv, node = self.cache.match_prefix(req.ids)
        self.check_match(req.ids, kv)
        assert kv[r:] == req.kv[r:] and len(kv) == len(req.ids)
        self.cache.lock(node)
        self.cache.unlock(req.node)
        req.kv, req.matched, req.node = kv, len(kv), node

    @rule(ids=TOKENS)
    def insert_without_request(self, ids: list[int]) -> None:
        if self.make_room(len(ids)):
            self.insert(ids, self.alloc.allocate(len(ids)), 0)

    @rule(ids=TOKENS)
    def match(self, ids: list[int]) -> None:
        kv, node = self.cache.match_prefix(ids)
        self.check_match(ids, kv)
        assert node.value == kv[len(kv) - len(node.value) :]

    @rule(ids=TOKENS)
    def pin(self, ids: list[int]) -> None:
        kv, node = self.cache.match_prefix(ids)
        self.cache.lock(node)
        self.pins.append(Pin(ids[: len(kv)], node))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        self.cache.unlock(self.pins.pop(self.pick(data, self.pins)).node)

    @rule(n=st.integers(0, 24))
    def evict(self, n: int) -> None:
        evictable_before = self.cache.sizes()[0]
        lru = min(unlocked_leaves(self.cache.root), key=lambda node: node.last_access, default=None)
        freed = self.cache.evict(n)
        if n > 0 and lru is not None:
            assert freed[: len(lru.value)] == lru.value, "did not evict the LRU leaf first"
        assert len(freed) <= evictable_before
        assert len(freed) >= n or self.cache.sizes()[0] == 0
        self.give_back(freed)

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def slots_are_accounted_for(self) -> None:
        evictable, protected = self.cache.sizes()
        outside = sum(len(req.kv) - req.matched for req in self.running)
        assert self.alloc.num_free + evictable + protected + outside == NUM_SLOTS
        owned = [slot for req in self.running for slot in req.kv[req.matched :]]
        self.alloc.check_integrity([*self.model.values(), *owned])

    @invariant()
    def tree_matches_model(self) -> None:
        self.cache.check_integrity()
        assert tree_map(self.cache.root) == self.model
        assert self.cache.total_size() == len(self.model)

    @invariant()
    def protected_is_exactly_the_locked_prefixes(self) -> None:
        locked = [req.ids[: req.matched] for req in self.running] + [p.prefix for p in self.pins]
        prefixes = {tuple(ids[: j + 1]) for ids in locked for j in range(len(ids))}
        assert self.cache.sizes()[1] == len(prefixes)


class DisabledRadixCacheMachine(RadixCacheMachine):
    disable = True


RadixCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
DisabledRadixCacheMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=30, deadline=None
)
TestRadixCache = RadixCacheMachine.TestCase
TestDisabledRadixCache = DisabledRadixCacheMachine.TestCase
