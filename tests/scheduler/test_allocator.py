from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.allocator import OutOfSlots, SlotAllocator


def test_fresh_allocator_hands_out_ascending_slots_from_1() -> None:
    alloc = SlotAllocator(8)
    assert alloc.allocate(3) == [1, 2, 3]
    assert alloc.allocate(5) == [4, 5, 6, 7, 8]
    assert (alloc.num_free, alloc.num_used) == (0, 8)


def test_slot_0_is_never_handed_out() -> None:
    alloc = SlotAllocator(100)
    got = alloc.allocate(60) + alloc.allocate(40)
    assert sorted(got) == list(range(1, 101))


@pytest.mark.parametrize("n", [0, 1, 4])
def test_can_allocate_up_to_num_free(n: int) -> None:
    alloc = SlotAllocator(4)
    assert alloc.can_allocate(n)
    assert not alloc.can_allocate(5)
    assert len(alloc.allocate(n)) == n
    assert alloc.num_free == 4 - n


def test_out_of_slots_allocates_nothing() -> None:
    alloc = SlotAllocator(4, debug=True)
    held = alloc.allocate(3)
    with pytest.raises(OutOfSlots) as info:
        alloc.allocate(2)
    assert (info.value.requested, info.value.available) == (2, 1)
    assert alloc.num_free == 1
    alloc.check_integrity(held)


def test_negative_count_is_rejected() -> None:
    with pytest.raises(ValueError):
        SlotAllocator(4).allocate(-1)
    with pytest.raises(ValueError):
        SlotAllocator(-1)


def test_free_round_trip_reuses_the_same_slots() -> None:
    alloc = SlotAllocator(10, debug=True)
    first = alloc.allocate(6)
    alloc.free(first[2:])
    alloc.check_integrity(first[:2])
    again = alloc.allocate(4)
    assert sorted(again) == sorted(first[2:])
    alloc.free(first[:2] + again)
    assert alloc.num_free == 10
    alloc.check_integrity([])


@pytest.mark.parametrize("bad", [[0], [11], [-1], [3, 3]])
def test_debug_free_rejects_out_of_range_and_double_free(bad: list[int]) -> None:
    alloc = SlotAllocator(10, debug=True)
    alloc.allocate(5)  # slots 1..5 held, 6..10 free
    with pytest.raises(AssertionError):
        alloc.free(bad)


def test_debug_free_rejects_a_slot_that_is_already_free() -> None:
    alloc = SlotAllocator(10, debug=True)
    alloc.allocate(2)
    with pytest.raises(AssertionError, match="double free"):
        alloc.free([7])


def test_reset_frees_everything() -> None:
    alloc = SlotAllocator(5, debug=True)
    held = alloc.allocate(4)
    alloc.reset()
    assert alloc.num_free == 5
    with pytest.raises(AssertionError):
        alloc.free(held)  # indices from before the reset are no longer owned
    assert alloc.allocate(5) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("held", "claimed"),
    [([1, 2], [1]), ([1], [1, 1]), ([1], [1, 3])],
    ids=["leak", "owned-twice", "free-and-used"],
)
def test_check_integrity_detects_accounting_errors(held: list[int], claimed: list[int]) -> None:
    alloc = SlotAllocator(3)
    assert alloc.allocate(len(held)) == held
    with pytest.raises(AssertionError):
        alloc.check_integrity(claimed)


def test_empty_pool() -> None:
    alloc = SlotAllocator(0)
    assert alloc.allocate(0) == []
    with pytest.raises(OutOfSlots):
        alloc.allocate(1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=40))
def test_random_allocate_free_keeps_integrity(ops: list[tuple[bool, int]]) -> None:
    alloc = SlotAllocator(16, debug=True)
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc and alloc.can_allocate(n):
            got = alloc.allocate(n)
            assert 0 not in got and not set(got) & set(held)
            held += got
        elif not is_alloc:
            alloc.free(held[:n])
            del held[:n]
        alloc.check_integrity(held)
        assert alloc.num_free + len(held) == 16
