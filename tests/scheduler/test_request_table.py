from __future__ import annotations

import pytest

from services.scheduler.request_table import NoFreeRow, RequestTable


def test_rows_are_handed_out_lowest_first_until_full() -> None:
    table = RequestTable(3)
    assert [table.allocate_row() for _ in range(3)] == [0, 1, 2]
    assert (table.num_free, table.num_used) == (0, 3)
    with pytest.raises(NoFreeRow):
        table.allocate_row()
    assert table.num_used == 3


def test_free_row_round_trip() -> None:
    table = RequestTable(4)
    rows = [table.allocate_row() for _ in range(4)]
    table.free_row(rows[1])
    assert (table.num_free, table.num_used) == (1, 3)
    assert table.allocate_row() == rows[1]


@pytest.mark.parametrize("row", [-1, 4, 2])
def test_free_row_rejects_unknown_or_free_rows(row: int) -> None:
    table = RequestTable(4)
    table.allocate_row()
    table.allocate_row()
    table.free_row(1)  # rows 1..3 free now
    with pytest.raises(AssertionError):
        table.free_row(row)


def test_double_free_row() -> None:
    table = RequestTable(2)
    row = table.allocate_row()
    table.free_row(row)
    with pytest.raises(AssertionError, match="double free"):
        table.free_row(row)


def test_reset() -> None:
    table = RequestTable(3)
    table.allocate_row()
    table.allocate_row()
    table.reset()
    assert (table.num_free, table.num_used) == (3, 0)
    assert table.allocate_row() == 0


def test_empty_table() -> None:
    table = RequestTable(0)
    with pytest.raises(NoFreeRow):
        table.allocate_row()
    with pytest.raises(ValueError):
        RequestTable(-1)
