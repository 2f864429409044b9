from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.radix_cache import RadixCache, TreeNode, _common_prefix_len

Shape = dict[tuple[int, ...], "Shape"]


def kv_of(ids: list[int], base: int) -> list[int]:
    """Distinct fake KV slots for a sequence: base + position."""
    return [base + i for i in range(len(ids))]


def shape(node: TreeNode) -> Shape:
    return {tuple(c.key): shape(c) for c in node.children.values()}


def build(*seqs: list[int]) -> RadixCache:
    """Insert each sequence with slots 100*(k+1) + position, so slots tell which insert won."""
    cache = RadixCache()
    for k, ids in enumerate(seqs):
        cache.insert(ids, kv_of(ids, 100 * (k + 1)))
    cache.check_integrity()
    return cache


# ---- match_prefix ------------------------------------------------------------------------------

MATCH_CASES = [
    # (inserted, query, expected kv, expected key of the returned node)
    ([], [1, 2], [], []),
    ([[1, 2, 3]], [], [], []),
    ([[1, 2, 3]], [7], [], []),
    ([[1, 2, 3]], [1, 2, 3], [100, 101, 102], [1, 2, 3]),
    ([[1, 2, 3]], [1, 2, 3, 9], [100, 101, 102], [1, 2, 3]),
    ([[1, 2, 3]], [1, 2, 9], [100, 101], [1, 2]),  # ends inside the edge: split
    ([[1, 2, 3]], [1, 2], [100, 101], [1, 2]),
    ([[1, 2], [1, 2, 3, 4]], [1, 2, 3, 4], [100, 101, 202, 203], [3, 4]),
    ([[1, 2, 3], [1, 2, 4]], [1, 2, 4, 4], [100, 101, 202], [4]),
]


@pytest.mark.parametrize(("seqs", "query", "kv", "key"), MATCH_CASES)
def test_match_prefix(
    seqs: list[list[int]], query: list[int], kv: list[int], key: list[int]
) -> None:
    cache = build(*seqs)
    before = cache.sizes()
    got, node = cache.match_prefix(query)
    assert got == kv
    assert node.key == key
    assert (node is cache.root) == (not kv)
    assert cache.sizes() == before  # matching never changes what is cached
    cache.check_integrity()


def test_match_split_leaves_a_node_covering_exactly_the_match() -> None:
    cache = build([1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 9])
    assert shape(cache.root) == {(1, 2): {(3, 4): {}}}
    assert node.value == [100, 101] and node.parent is cache.root
    assert cache.match_prefix([1, 2, 3, 4])[0] == [100, 101, 102, 103]


@pytest.mark.parametrize(
    "query", [(1, 2, 3), np.array([1, 2, 3]), range(1, 4)], ids=["tuple", "numpy", "range"]
)
def test_match_accepts_any_int_sequence(query: object) -> None:
    cache = build([1, 2, 3])
    cache.insert(np.array([5, 6]), np.array([7, 8]))
    assert cache.match_prefix(query)[0] == [100, 101, 102]  # type: ignore[arg-type]
    assert cache.match_prefix([5, 6])[0] == [7, 8]
    cache.check_integrity()


# ---- insert ------------------------------------------------------------------------------------

INSERT_CASES = [
    # (sequences inserted in order, return value of each insert, final tree shape)
    ([[1, 2, 3]], [0], {(1, 2, 3): {}}),
    ([[1, 2, 3], [1, 2, 3]], [0, 3], {(1, 2, 3): {}}),
    ([[1, 2], [1, 2, 3, 4]], [0, 2], {(1, 2): {(3, 4): {}}}),  # extends a leaf
    ([[1, 2, 3], [1, 2, 4]], [0, 2], {(1, 2): {(3,): {}, (4,): {}}}),  # branches
    ([[1, 2, 3], [1, 2]], [0, 2], {(1, 2): {(3,): {}}}),  # prefix of a leaf: split
    ([[1], [2]], [0, 0], {(1,): {}, (2,): {}}),
    ([[1, 2, 3], []], [0, 0], {(1, 2, 3): {}}),
    ([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5]], [0, 2, 3], {(1, 2): {(3,): {(5,): {}}, (4,): {}}}),
]


@pytest.mark.parametrize(("seqs", "returns", "tree"), INSERT_CASES)
def test_insert(seqs: list[list[int]], returns: list[int], tree: Shape) -> None:
    cache = RadixCache()
    got = [cache.insert(ids, kv_of(ids, 100 * (k + 1))) for k, ids in enumerate(seqs)]
    assert got == returns
    assert shape(cache.root) == tree
    cache.check_integrity()


def test_insert_keeps_the_cached_slots_and_takes_only_the_new_tail() -> None:
    cache = build([1, 2, 3])
    kv = [900, 901, 902, 903, 904]
    overlap = cache.insert([1, 2, 3, 4, 5], kv)
    assert overlap == 3  # kv[:3] stays with the caller, who frees it
    assert cache.match_prefix([1, 2, 3, 4, 5])[0] == [100, 101, 102, 903, 904]
    assert cache.total_size() == 5


def test_insert_copies_its_inputs() -> None:
    cache = RadixCache()
    ids, kv = [1, 2], [10, 11]
    cache.insert(ids, kv)
    ids.append(3)
    kv[0] = 99
    assert cache.match_prefix([1, 2, 3])[0] == [10, 11]


def test_insert_rejects_length_mismatch() -> None:
    with pytest.raises(AssertionError):
        RadixCache().insert([1, 2], [1])


# ---- eviction ----------------------------------------------------------------------------------


def test_evict_oldest_leaf_first() -> None:
    cache = build([1, 1], [2, 2], [3, 3])
    assert cache.evict(1) == [100, 101]  # a whole edge goes, even if fewer tokens were asked
    assert cache.evict(2) == [200, 201]
    assert cache.sizes() == (2, 0)
    cache.check_integrity()


@pytest.mark.parametrize(
    ("touch", "first_evicted"),
    [
        (lambda c: c.match_prefix([1, 1]), [200, 201]),
        (lambda c: c.match_prefix([1, 9]), [101]),  # only the matched part is refreshed
        (lambda c: c.insert([1, 1], [7, 8]), [200, 201]),
        (lambda c: c.match_prefix([2, 2]), [100, 101]),
        (lambda c: c.match_prefix([9]), [100, 101]),
    ],
)
def test_access_refreshes_lru(touch: object, first_evicted: list[int]) -> None:
    cache = build([1, 1], [2, 2], [3, 3])
    touch(cache)  # type: ignore[operator]
    cache.check_integrity()
    assert cache.evict(1) == first_evicted


def test_evict_a_chain_leaf_first() -> None:
    cache = build([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    assert cache.evict(1) == [305]
    assert cache.evict(1) == [203, 204]
    assert cache.evict(1) == [100, 101, 102]
    assert cache.total_size() == 0 and shape(cache.root) == {}
    cache.check_integrity()


def test_evict_all_returns_every_slot_children_before_parents() -> None:
    cache = build([1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
    assert cache.evict(100) == [305, 203, 204, 100, 101, 102]


def test_an_emptied_parent_competes_by_its_own_last_access() -> None:
    cache = build([1, 2], [1, 2, 3], [9])
    assert cache.evict(1) == [202]  # leaf [3]; now [1, 2] is a leaf, older than [9]
    assert cache.evict(1) == [100, 101]
    assert cache.evict(1) == [300]


@pytest.mark.parametrize(("n", "freed"), [(0, 0), (2, 3), (3, 3), (10, 3)])
def test_evict_more_than_available_returns_what_it_can(n: int, freed: int) -> None:
    cache = build([1, 2, 3])
    assert len(cache.evict(n)) == freed
    assert cache.sizes() == (3 - freed, 0)
    cache.check_integrity()


# ---- locking -----------------------------------------------------------------------------------


def test_locked_leaf_is_never_evicted() -> None:
    cache = build([1, 1], [2, 2])
    _, node = cache.match_prefix([1, 1])
    cache.lock(node)
    assert cache.sizes() == (2, 2)
    assert cache.evict(100) == [200, 201]
    assert cache.evict(100) == []
    assert cache.sizes() == (0, 2)
    cache.unlock(node)
    assert cache.sizes() == (2, 0)
    assert cache.evict(100) == [100, 101]
    cache.check_integrity()


@pytest.mark.parametrize(
    ("seqs", "locked", "evicted", "sizes_after"),
    [
        ([[1, 2, 3], [1, 2, 3, 4]], [1, 2, 3, 4], [], (0, 4)),  # deep lock protects ancestors
        ([[1, 2, 3], [1, 2, 4]], [1, 2, 3], [202], (0, 3)),  # the sibling branch is evictable
        ([[1, 2, 3], [1, 2, 4]], [1, 2], [102, 202], (0, 2)),  # split, then lock the stem
        ([[1, 2, 3, 4]], [1, 2], [102, 103], (0, 2)),
    ],
)
def test_lock_protects_the_whole_path(
    seqs: list[list[int]], locked: list[int], evicted: list[int], sizes_after: tuple[int, int]
) -> None:
    cache = build(*seqs)
    _, node = cache.match_prefix(locked)
    cache.lock(node)
    cache.check_integrity()
    assert sorted(cache.evict(100)) == evicted
    assert cache.sizes() == sizes_after
    cache.check_integrity()


def test_locks_are_reference_counted() -> None:
    cache = build([1, 2])
    _, node = cache.match_prefix([1, 2])
    cache.lock(node)
    cache.lock(node)
    cache.unlock(node)
    assert cache.evict(10) == []
    cache.unlock(node)
    assert cache.evict(10) == [100, 101]
    with pytest.raises(AssertionError):
        cache.lock(node)  # evicted node


def test_split_of_a_locked_node_keeps_the_accounting() -> None:
    cache = build([1, 2, 3, 4])
    _, deep = cache.match_prefix([1, 2, 3, 4])
    cache.lock(deep)
    _, stem = cache.match_prefix([1, 2])  # splits the locked edge
    assert stem.lock_ref == 1 and cache.sizes() == (0, 4)
    cache.check_integrity()
    cache.unlock(deep)
    assert cache.sizes() == (4, 0)
    cache.check_integrity()
    assert cache.evict(1) == [102, 103]


def test_lock_root_is_a_no_op_and_unlock_needs_a_lock() -> None:
    cache = build([1])
    cache.lock(cache.root)
    cache.unlock(cache.root)
    _, node = cache.match_prefix([1])
    with pytest.raises(AssertionError):
        cache.unlock(node)


def test_repeated_lock_unlock_keeps_the_lru_heap_bounded() -> None:
    cache = build([1, 2], [3])
    for _ in range(1000):
        _, node = cache.match_prefix([1, 2])
        cache.lock(node)
        cache.unlock(node)
    assert len(cache._heap) <= 2 * 2 + 64
    cache.check_integrity()
    assert cache.evict(1) == [200]


# ---- disabled, reset ---------------------------------------------------------------------------


def test_disabled_cache_caches_nothing_and_the_caller_frees_everything() -> None:
    cache = RadixCache(disable=True)
    kv = [5, 6, 7]
    assert cache.insert([1, 2, 3], kv) == 3  # caller frees kv[matched=0:3], i.e. all of it
    assert cache.match_prefix([1, 2, 3]) == ([], cache.root)
    cache.lock(cache.root)
    cache.unlock(cache.root)
    assert cache.evict(10) == []
    assert cache.sizes() == (0, 0) and cache.total_size() == 0
    cache.check_integrity()


def test_reset_empties_the_tree() -> None:
    cache = build([1, 2], [1, 3])
    _, node = cache.match_prefix([1, 2])
    cache.lock(node)
    cache.reset()
    assert cache.sizes() == (0, 0) and shape(cache.root) == {}
    assert cache.match_prefix([1, 2])[0] == []
    cache.check_integrity()


def test_check_integrity_detects_corruption() -> None:
    cache = build([1, 2, 3], [1, 2, 4])
    cache._evictable += 1
    with pytest.raises(AssertionError, match="counted"):
        cache.check_integrity()
    cache._evictable -= 1
    _, node = cache.match_prefix([1, 2, 3])
    node.lock_ref = 1  # a lock the counters never saw
    with pytest.raises(AssertionError):
        cache.check_integrity()


# ---- edge comparison ---------------------------------------------------------------------------


@pytest.mark.parametrize("mismatch", [0, 1, 63, 64, 65, 150, 199])
def test_long_edges_split_at_the_first_mismatch(mismatch: int) -> None:
    ids = list(range(1000, 1200))
    cache = RadixCache()
    cache.insert(ids, ids)
    query = [*ids[:mismatch], -1]
    kv, node = cache.match_prefix(query)
    assert kv == ids[:mismatch]
    assert node.key == ids[:mismatch]
    cache.check_integrity()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 1), max_size=200),
    st.lists(st.integers(0, 1), max_size=200),
    st.integers(0, 5),
)
def test_common_prefix_len_matches_a_naive_loop(key: list[int], ids: list[int], start: int) -> None:
    start = min(start, len(ids))
    naive = 0
    while naive < min(len(key), len(ids) - start) and key[naive] == ids[start + naive]:
        naive += 1
    assert _common_prefix_len(key, ids, start) == naive


# ---- discard -----------------------------------------------------------------------------------


def test_discard_cuts_an_edge_at_the_first_bad_slot_and_drops_what_hangs_below() -> None:
    # [1,2,3,4] → slots 100..103; [1,2,3,4,5,6] adds [5,6] (204,205); [1,2,9] splits at 2 (302).
    cache = build([1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1, 2, 9], [7, 8])
    freed = cache.discard({102})  # the slot of token 3 on the [3,4] edge
    assert sorted(freed) == [102, 103, 204, 205]
    assert shape(cache.root) == {(1, 2): {(9,): {}}, (7, 8): {}}
    assert cache.match_prefix([1, 2, 3, 4, 5])[0] == [100, 101]
    assert cache.total_size() == 5
    cache.check_integrity()


def test_discard_of_slots_the_tree_does_not_hold_changes_nothing() -> None:
    cache = build([1, 2, 3], [4, 5])
    assert cache.discard({999}) == []
    assert shape(cache.root) == {(1, 2, 3): {}, (4, 5): {}}
    assert cache.total_size() == 5


def test_discard_refuses_a_locked_edge() -> None:
    cache = build([1, 2, 3])
    _, node = cache.match_prefix([1, 2, 3])
    cache.lock(node)
    with pytest.raises(AssertionError):
        cache.discard({101})
