"""Token-granular KV-slot allocator (metadata only; the executor holds the tensors).

Slots are 1..num_slots; slot 0 is the padding slot and is never handed out, so the executor's pool
has num_slots + 1 rows. The free list is a Python list used as a stack, kept so that a fresh
allocator hands out ascending, contiguous slots. allocate and free cost O(n) in the number of slots
moved, never O(pool).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class OutOfSlots(Exception):
    """Not enough free KV slots; nothing was allocated."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"requested {requested} KV slots, {available} free")
        self.requested = requested
        self.available = available


class SlotAllocator:
    """Free list over KV slots 1..num_slots.

    With `debug=True` every allocate/free also keeps a per-slot state byte, so `free` asserts that
    each index is in range and currently allocated (catching double frees at the faulty call).
    The default path does no per-index checking.
    """

    def __init__(self, num_slots: int, debug: bool = False) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.num_slots = num_slots
        self.debug = debug
        self.reset()

    def reset(self) -> None:
        """Mark every slot free again (the caller drops every outstanding index)."""
        # Descending, so the top of the stack (the end) holds the lowest slot.
        self._free: list[int] = list(range(self.num_slots, 0, -1))
        # _allocated[i] == 1 iff slot i is handed out; only maintained in debug mode.
        self._allocated = bytearray(self.num_slots + 1) if self.debug else None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free slots. Raises OutOfSlots (allocating nothing) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        free = self._free
        if n > len(free):
            raise OutOfSlots(n, len(free))
        start = len(free) - n
        out = free[start:]
        del free[start:]
        out.reverse()
        if self._allocated is not None:
            for i in out:
                self._allocated[i] = 1
        return out

    def free(self, indices: Sequence[int]) -> None:
        """Return slots to the free list. The caller must own them (allocated, not yet freed)."""
        if self._allocated is not None:
            self._check_and_mark_free(indices)
        self._free.extend(indices)

    def _check_and_mark_free(self, indices: Sequence[int]) -> None:
        allocated = self._allocated
        assert allocated is not None
        for i in indices:
            assert 0 < i <= self.num_slots, f"slot {i} out of range 1..{self.num_slots}"
            assert allocated[i], f"slot {i} freed but not allocated (double free?)"
            allocated[i] = 0

    def check_integrity(self, in_use: Iterable[int]) -> None:
        """Assert free slots + in_use are exactly 1..num_slots, each once. O(pool): tests/idle only."""
        free = self._free
        free_set = set(free)
        assert len(free_set) == len(free), "duplicate slot in the free list"
        used = list(in_use)
        used_set = set(used)
        assert len(used_set) == len(used), "a slot is owned twice"
        assert not (free_set & used_set), (
            f"slots both free and in use: {sorted(free_set & used_set)[:8]}"
        )
        everything = free_set | used_set
        assert len(everything) == self.num_slots, (
            f"{self.num_slots - len(everything)} slots leaked (neither free nor in use)"
        )
        assert min(everything, default=1) >= 1 and max(everything, default=0) <= self.num_slots
        if self._allocated is not None:
            assert all(self._allocated[i] for i in used_set)
            assert not any(self._allocated[i] for i in free_set)
