"""The attention backend interface: store the step's K/V, then `extend` and `decode` attention.

A backend reads keys and values only from the KV pool, through the request→KV-slot table, so a
request's cached prefix and its new tokens are one uniform sequence of slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.executor.forward_batch import ForwardBatch
from services.executor.kv_pool import KVPool, RequestToTokenTable

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        ATTENTION_BACKENDS[name] = cls
        return cls

    return wrap


class AttentionBackend:
    """Batched attention over every request of a step; no Python loop over requests."""

    name = "base"

    def __init__(
        self,
        pool: KVPool,
        table: RequestToTokenTable,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
    ) -> None:
        self.pool, self.table = pool, table
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def init_metadata(self, batch: ForwardBatch) -> None:
        """Builds per-step metadata shared by all layers into `batch.attn_metadata`."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] → out: [T, H, D]
        self.pool.store(layer, batch.out_cache_loc, k, v)
        n_ext = batch.num_extend_tokens
        if batch.num_decode == 0:
            return self.extend(layer, q, batch)
        if batch.num_extend == 0:
            return self.decode(layer, q, batch)
        return torch.cat(
            [self.extend(layer, q[:n_ext], batch), self.decode(layer, q[n_ext:], batch)]
        )

    def extend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError


def create_backend(name: str, **kwargs: object) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}"
        )
    return ATTENTION_BACKENDS[name](**kwargs)  # type: ignore[arg-type]
