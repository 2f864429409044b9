"""Rows of the request→KV-slot table (metadata only).

The executor keeps a table of the same max_rows rows, [max_rows, context_length] of KV slots; the
scheduler decides which request uses which row and tells the executor what to write there.
Every row 0..max_rows-1 is usable.
"""

from __future__ import annotations


class NoFreeRow(Exception):
    """All rows of the request table are in use."""


class RequestTable:
    """Free list over rows 0..max_rows-1; allocate_row/free_row are O(1)."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {max_rows}")
        self.max_rows = max_rows
        self.reset()

    def reset(self) -> None:
        """Mark every row free again."""
        # Descending, so rows are handed out lowest first.
        self._free: list[int] = list(range(self.max_rows - 1, -1, -1))
        self._in_use = bytearray(self.max_rows)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.max_rows - len(self._free)

    def allocate_row(self) -> int:
        """Take a free row. Raises NoFreeRow when every row is in use."""
        if not self._free:
            raise NoFreeRow(f"all {self.max_rows} request rows are in use")
        row = self._free.pop()
        self._in_use[row] = 1
        return row

    def free_row(self, row: int) -> None:
        """Return a row taken by allocate_row; freeing a free or unknown row is a bug."""
        assert 0 <= row < self.max_rows, f"row {row} out of range 0..{self.max_rows - 1}"
        assert self._in_use[row], f"row {row} freed but not in use (double free?)"
        self._in_use[row] = 0
        self._free.append(row)
