"""The KV cache tensors and the executor's mirror of the request→KV-slot table.

The scheduler decides which slot holds which token; this module only stores. Slot 0 is the padding
slot: it is never handed out, so reading it for a padded position is always harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.kv_cache_dtype import store_rows


class KVPool:
    """Per layer a K and a V buffer of shape [num_slots + 1, num_kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = num_slots
        shape = (num_slots + 1, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def store(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # loc: [T]; k, v: [T, num_kv_heads, head_dim]
        store_rows(self.k[layer], loc, k)
        store_rows(self.v[layer], loc, v)

    def zero_slot(self, slot: int) -> None:
        for k, v in zip(self.k, self.v, strict=True):
            k[slot].zero_()
            v[slot].zero_()

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        )


class RequestToTokenTable:
    """table[row, pos] = KV slot of the request in `row` at position `pos` ([rows, context])."""

    def __init__(self, max_rows: int, context_length: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.context_length = context_length
        self.table = torch.zeros((max_rows, context_length), dtype=torch.int64, device=device)

    def write(self, row: int, start: int, kv_indices: torch.Tensor) -> None:
        self.table[row, start : start + kv_indices.shape[0]] = kv_indices

    def write_many(self, writes: TableWrites) -> None:
        """All of a Step's slot writes as one indexed copy."""
        dev = self.table.device
        self.table[writes.rows.to(dev), writes.cols.to(dev)] = writes.slots.to(dev)

    def clear_rows(self, rows: list[int]) -> None:
        self.table[torch.tensor(rows, dtype=torch.int64, device=self.table.device)] = 0

    def clear_row(self, row: int) -> None:
        self.table[row].zero_()

    def reset(self) -> None:
        self.table.zero_()


@dataclass
class TableWrites:
    """Slot writes flattened on the host: table[rows[i], cols[i]] = slots[i] ([N] int64 each)."""

    rows: torch.Tensor
    cols: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def concat(cls, writes: list[tuple[int, int, list[int]]]) -> TableWrites:
        """From (row, start, kv_indices) triples, in order; where two writes of one Step name the
        same entry the later one wins, as if they were applied one by one."""
        rows: list[int] = []
        cols: list[int] = []
        slots: list[int] = []
        for row, start, kv in writes:
            rows += [row] * len(kv)
            cols += range(start, start + len(kv))
            slots += kv
        out = cls(*(torch.tensor(v, dtype=torch.int64) for v in (rows, cols, slots)))
        # Writes to distinct rows cannot name one entry twice (a write's columns are distinct).
        distinct = len({row for row, _, _ in writes}) == len(writes)
        return out if distinct else out._last_wins()

    def _last_wins(self) -> TableWrites:
        # index_put with repeated indices leaves any one of the values, so drop earlier repeats
        n = self.rows.numel()
        if n < 2:
            return self
        keys = self.rows * (int(self.cols.max()) + 1) + self.cols
        uniq, inverse = torch.unique(keys, return_inverse=True)
        if uniq.numel() == n:
            return self
        last = torch.full_like(uniq, -1).scatter_reduce(0, inverse, torch.arange(n), "amax")
        return TableWrites(self.rows[last], self.cols[last], self.slots[last])
