"""Radix tree over token ids → KV slot indices (page size 1): the prefix cache index.

The tree is a pure index. It holds KV slot numbers, never tensors, and never frees a slot itself:
`evict` hands the slots back and the caller returns them to the allocator.

Ownership and locking rules (the caller is the scheduler):

- Every slot stored in the tree is owned by the tree until `evict` returns it.
- `match_prefix` returns the tree's own slots. The caller must not free them, and must `lock` the
  returned node before the next `evict` (a running request locks its matched prefix until it
  finishes). A locked node and all its ancestors are protected: `evict` never removes them.
- `insert(ids, kv)` returns r, the number of leading tokens already cached. The tree takes ownership
  of `kv[r:]`; `kv[:r]` stays with the caller. Of those, the slots the caller got from
  `match_prefix` are the tree's own (nothing to do) and the rest duplicate cached tokens, so the
  caller frees them. A request that matched m tokens (and kept them locked, so r >= m) finishes with
  `r = insert(ids, kv); allocator.free(kv[m:r]); unlock(node)`.
- Disabled (`--disable-radix-cache`): `match_prefix` matches nothing (m = 0) and `insert` caches
  nothing and returns len(ids), so the same finish code frees every slot of the request.

Accounting: every token in the tree is either evictable (its node has lock_ref == 0) or protected;
`sizes()` keeps both counts incrementally. With the allocator's free count this gives the invariant
`free + evictable + protected + owned-by-running-requests-outside-the-tree == total`.

LRU: each node records the logical clock of its last access (every `match_prefix` and `insert`
touches the whole path). Unlocked leaves sit in a lazily invalidated heap keyed by that clock; a
parent enters it when its last child is evicted, so evicting never scans the tree.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class TreeNode:
    """An edge of the radix tree: the tokens `key` (KV slots `value`) below `parent`."""

    key: list[int]  # token ids on the edge; empty only for the root
    value: list[int]  # value[i] = KV slot of key[i]
    parent: TreeNode | None = field(default=None, repr=False)  # None: root, or evicted
    children: dict[int, TreeNode] = field(default_factory=dict, repr=False)  # key[0] -> child
    lock_ref: int = 0  # locks on this node or any descendant
    last_access: int = 0  # logical clock of the last match/insert through this node
    id: int = 0  # unique per cache; breaks heap ties


HeapEntry = tuple[int, int, TreeNode]  # (last_access, id, node)


class RadixCache:
    """Prefix cache index; see the module docstring for the ownership and locking rules."""

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self.reset()

    def reset(self) -> None:
        """Drop every node. The caller must reset the allocator too (the slots are not returned)."""
        self.root = TreeNode(key=[], value=[])
        self._evictable = 0
        self._protected = 0
        self._num_nodes = 0  # excluding the root
        self._clock = 0
        self._next_id = 1
        self._heap: list[HeapEntry] = []  # unlocked leaves (and stale entries), LRU first

    # ---- queries -------------------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        """(evictable tokens, protected tokens), O(1)."""
        return self._evictable, self._protected

    def total_size(self) -> int:
        """Tokens (= KV slots) held by the tree."""
        return self._evictable + self._protected

    def slots(self) -> list[int]:
        """Every KV slot held by the tree. O(tree): tests/idle only."""
        out: list[int] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.value)
            stack.extend(node.children.values())
        return out

    def match_prefix(self, ids: Sequence[int]) -> tuple[list[int], TreeNode]:
        """KV slots of the longest cached prefix of ids, and the node ending exactly there.

        Splits an edge when the match ends inside it. Refreshes the LRU clock along the path.
        The slots stay the tree's: lock the node to keep them (see the module docstring).
        """
        if self.disable or len(ids) == 0:
            return [], self.root
        tokens = _as_list(ids)
        now = self._tick()
        out: list[int] = []
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_prefix_len(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)  # the next lookup then finds no child
            child.last_access = now
            out.extend(child.value)
            node, i = child, i + k
        self._push_if_evictable(node)
        return out, node

    # ---- updates -------------------------------------------------------------------------------

    def insert(self, ids: Sequence[int], kv_indices: Sequence[int]) -> int:
        """Cache ids → kv_indices; return r, how many leading tokens were already cached.

        The tree takes ownership of kv_indices[r:]; kv_indices[:r] remain the caller's, who frees
        those it allocated itself (they duplicate cached slots). Disabled: caches nothing and
        returns len(ids), so the caller frees everything it owns.
        """
        assert len(ids) == len(kv_indices), f"{len(ids)} ids but {len(kv_indices)} kv indices"
        if self.disable:
            return len(ids)
        tokens, kv = _as_list(ids), _as_list(kv_indices)
        now = self._tick()
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                node = self._add_leaf(node, tokens[i:], kv[i:], now)
                break
            k = _common_prefix_len(child.key, tokens, i)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = now
            node, i = child, i + k
        self._push_if_evictable(node)
        return i

    def lock(self, node: TreeNode) -> None:
        """Protect node and its ancestors from eviction (reference counted; root: no-op)."""
        cur: TreeNode | None = node
        while cur is not self.root:
            assert cur is not None, "lock on an evicted node"
            if cur.lock_ref == 0:
                self._evictable -= len(cur.key)
                self._protected += len(cur.key)
            cur.lock_ref += 1
            cur = cur.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one `lock(node)`."""
        cur: TreeNode | None = node
        while cur is not self.root:
            assert cur is not None and cur.lock_ref > 0, "unlock without a matching lock"
            cur.lock_ref -= 1
            if cur.lock_ref == 0:
                self._evictable += len(cur.key)
                self._protected -= len(cur.key)
                self._push_if_evictable(cur)
            cur = cur.parent

    def evict(self, n_tokens: int) -> list[int]:
        """Remove unlocked leaves, least recently used first, until >= n_tokens are freed.

        Returns the freed KV slots (possibly more than n_tokens: whole edges go; fewer when not
        enough is evictable). The caller must return them to the allocator.
        """
        out: list[int] = []
        while len(out) < n_tokens:
            node = self._pop_lru_leaf()
            if node is None:
                break
            out.extend(node.value)
            self._remove_leaf(node)
        return out

    def discard(self, slots: set[int]) -> list[int]:
        """Remove every edge holding one of `slots` from that slot on, with everything below it
        (KV computed after garbage is garbage too). Returns the KV slots removed; the caller
        returns them to the allocator. O(tree): for failures only.

        Raises AssertionError if a removed edge is locked: whoever holds it must let go first.
        """
        out: list[int] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            k = next((i for i, slot in enumerate(node.value) if slot in slots), None)
            if k is None:
                stack.extend(node.children.values())
                continue
            if k > 0:
                self._split(node, k)  # the part before the first bad slot stays
            out.extend(self._remove_subtree(node))
        return out

    # ---- internals -----------------------------------------------------------------------------

    def _remove_subtree(self, top: TreeNode) -> list[int]:
        """Removes `top` and its descendants, leaves first; returns their slots."""
        out: list[int] = []
        order, stack = [], [top]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(node.children.values())
        for node in reversed(order):  # every child before its parent
            out.extend(node.value)
            self._remove_leaf(node)
        return out

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key: list[int], value: list[int], parent: TreeNode) -> TreeNode:
        node = TreeNode(key=key, value=value, parent=parent, id=self._next_id)
        self._next_id += 1
        self._num_nodes += 1
        return node

    def _add_leaf(self, parent: TreeNode, key: list[int], value: list[int], now: int) -> TreeNode:
        leaf = self._new_node(key, value, parent)
        leaf.last_access = now
        parent.children[key[0]] = leaf
        self._evictable += len(key)
        return leaf

    def _split(self, child: TreeNode, k: int) -> TreeNode:
        """Cut child's edge after k tokens; return the new upper node (it inherits locks and LRU)."""
        parent = child.parent
        assert parent is not None and 0 < k < len(child.key)
        mid = self._new_node(child.key[:k], child.value[:k], parent)
        mid.lock_ref, mid.last_access = child.lock_ref, child.last_access
        child.key, child.value, child.parent = child.key[k:], child.value[k:], mid
        mid.children[child.key[0]] = child
        parent.children[mid.key[0]] = mid
        return mid

    def _remove_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and not node.children and node.lock_ref == 0
        del parent.children[node.key[0]]
        node.parent = None
        self._evictable -= len(node.key)
        self._num_nodes -= 1
        self._push_if_evictable(parent)

    def _is_evictable_leaf(self, node: TreeNode) -> bool:
        # parent is None for the root and for evicted nodes.
        return node.parent is not None and not node.children and node.lock_ref == 0

    def _push_if_evictable(self, node: TreeNode) -> None:
        if not self._is_evictable_leaf(node):
            return
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._compact_heap()

    def _is_live(self, entry: HeapEntry) -> bool:
        last_access, _, node = entry
        return last_access == node.last_access and self._is_evictable_leaf(node)

    def _pop_lru_leaf(self) -> TreeNode | None:
        heap = self._heap
        while heap:
            entry = heapq.heappop(heap)
            if self._is_live(entry):
                return entry[2]
        return None

    def _compact_heap(self) -> None:
        # Keep one live entry per node, so the heap is back to <= num_nodes entries (amortized O(1)).
        live = {entry[1]: entry for entry in self._heap if self._is_live(entry)}
        self._heap = list(live.values())
        heapq.heapify(self._heap)

    # ---- checks --------------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Walk the whole tree and assert every structural invariant. O(tree): tests/idle only."""
        root = self.root
        assert not root.key and not root.value and root.parent is None and root.lock_ref == 0
        assert not (self.disable and root.children), "a disabled cache holds nodes"
        live = {(entry[0], entry[1]) for entry in self._heap if entry[2].parent is not None}
        evictable = protected = nodes = 0
        slots: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            child_locks = self._check_children(node, stack)
            if node is root:
                continue
            nodes += 1
            assert node.lock_ref >= child_locks, f"node {node.id}: lock_ref below its children's"
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            assert slots.isdisjoint(node.value), f"node {node.id}: a KV slot is cached twice"
            slots.update(node.value)
            if self._is_evictable_leaf(node):
                assert (node.last_access, node.id) in live, f"leaf {node.id} missing from LRU heap"
        assert (evictable, protected) == (self._evictable, self._protected), (
            f"counted {(evictable, protected)}, tracked {(self._evictable, self._protected)}"
        )
        assert nodes == self._num_nodes, f"counted {nodes} nodes, tracked {self._num_nodes}"

    def _check_children(self, node: TreeNode, stack: list[TreeNode]) -> int:
        child_locks = 0
        for first, child in node.children.items():
            assert child.parent is node, f"node {child.id}: wrong parent"
            assert child.key, f"node {child.id}: empty edge"
            assert child.key[0] == first, f"node {child.id}: child key {first} != {child.key[0]}"
            assert len(child.key) == len(child.value), f"node {child.id}: key/value lengths differ"
            assert child.lock_ref >= 0, f"node {child.id}: negative lock_ref"
            assert node is self.root or child.last_access <= node.last_access, (
                f"node {child.id}: accessed after its parent"
            )
            child_locks += child.lock_ref
            stack.append(child)
        return child_locks


def _as_list(seq: Sequence[int]) -> list[int]:
    if type(seq) is list:
        return seq
    tolist = getattr(seq, "tolist", None)  # numpy arrays: plain ints, in C
    return tolist() if tolist is not None else list(seq)


_CHUNK = 64


def _common_prefix_len(key: list[int], ids: list[int], start: int) -> int:
    """Length of the common prefix of key and ids[start:], comparing in C where possible."""
    n = min(len(key), len(ids) - start)
    if n == len(key) and key == ids[start : start + n]:
        return n  # the common case: the whole edge matches
    i = 0
    while i + _CHUNK <= n and key[i : i + _CHUNK] == ids[start + i : start + i + _CHUNK]:
        i += _CHUNK
    while i < n and key[i] == ids[start + i]:
        i += 1
    return i
