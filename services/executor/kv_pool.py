"""The KV cache tensors and the executor's mirror of the request→KV-slot table.

The scheduler decides which slot holds which token; this module only stores. Slot 0 is the padding
slot: it is never handed out, so reading it for a padded position is always harmless.
"""

from __future__ import annotations

import torch


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
        self.k[layer].index_copy_(0, loc, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, loc, v.to(self.v[layer].dtype))

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

    def clear_row(self, row: int) -> None:
        self.table[row].zero_()

    def reset(self) -> None:
        self.table.zero_()
