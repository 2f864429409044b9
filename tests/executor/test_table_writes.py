"""A Step's slot writes land in the request→KV-slot table as one indexed copy."""

from __future__ import annotations

import torch

from services.executor.kv_pool import RequestToTokenTable, TableWrites


def one_by_one(writes: list[tuple[int, int, list[int]]]) -> torch.Tensor:
    table = RequestToTokenTable(4, 16, torch.device("cpu"))
    for row, start, kv in writes:
        table.write(row, start, torch.tensor(kv))
    return table.table


def test_concatenated_writes_equal_writes_applied_in_order() -> None:
    writes = [
        (0, 0, [1, 2, 3, 4]),
        (2, 3, [9, 10]),
        (1, 0, [1, 2, 3]),  # a shared prefix: same slots as row 0
        (0, 2, [7, 8, 11]),  # overlaps the first write; the later one wins
        (3, 15, [5]),
    ]
    table = RequestToTokenTable(4, 16, torch.device("cpu"))
    table.write_many(TableWrites.concat(writes))
    assert torch.equal(table.table, one_by_one(writes))


def test_clear_rows_zeroes_only_those_rows() -> None:
    table = RequestToTokenTable(3, 4, torch.device("cpu"))
    table.write_many(TableWrites.concat([(r, 0, [r + 1] * 4) for r in range(3)]))
    table.clear_rows([0, 2])
    assert table.table.tolist() == [[0] * 4, [2] * 4, [0] * 4]
