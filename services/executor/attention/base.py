"""The attention backend interface: store the step's K/V, then `extend` and `decode` attention.

A backend reads keys and values only from the KV pool, through the request→KV-slot table, so a
request's cached prefix and its new tokens are one uniform sequence of slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from services.executor.config import ATTENTION_BACKEND_NAMES
from services.executor.forward_batch import ForwardBatch
from services.executor.kv_pool import KVPool, RequestToTokenTable
from services.executor.step import SharedPrefix, Slice

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator: the backend `--attention-backend name` selects. Raises ValueError for a
    name not in the config's ATTENTION_BACKEND_NAMES (the flag's choices), so every registered
    backend can be chosen; tests/common/test_cli.py checks that every choice is registered."""
    if name not in ATTENTION_BACKEND_NAMES:
        raise ValueError(f"attention backend {name!r} is not in {ATTENTION_BACKEND_NAMES}")

    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        cls.name = name
        ATTENTION_BACKENDS[name] = cls
        return cls

    return wrap


def shared_prefix_mode(env: str) -> str:
    """The value of the environment variable `env` that picks a backend's shared-prefix spans:
    auto (the backend's rule, the default), always or never. Raises ValueError for another."""
    mode = os.environ.get(env, "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"{env}={mode!r}: use auto, always, never")
    return mode


def decode_groups(
    spans: list[SharedPrefix], slices: list[Slice], min_rows: int, min_length: int
) -> list[SharedPrefix]:
    """Each span cut down to its rows that decode one token in `slices`, kept where at least
    `min_rows` of them share at least `min_length` positions."""
    decoding = {s.row for s in slices if s.length == 1}
    kept = []
    for span in spans:
        rows = [r for r in span.rows if r in decoding]
        if len(rows) >= min_rows and span.length >= min_length:
            kept.append(SharedPrefix(span.length, rows))
    return kept


class AttentionBackend:
    """Batched attention over every request of a step; no Python loop over requests.

    A backend with `supports_shared_prefixes` also runs batches with `batch.shared` set (rows
    sharing a cached prefix): `shared_prefix` attends each group's span once for all its tokens,
    `extend_tail` / `decode_tail` each slice's own keys, and `merge` combines the two parts by
    log-sum-exp. Other backends never see `batch.shared` (the engine drops it).
    """

    name = "base"
    supports_shared_prefixes = False
    # Pure-decode batches of up to this many rows replay a captured CUDA graph of the plain decode
    # path (set by the engine when it captures them; 0: none). A backend may leave such steps'
    # spans out, as the graph cannot take them.
    graph_decode_rows = 0

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

    def make_batch_invariant(self) -> None:
        """Switches to computing each query token's attention by one fixed procedure that depends
        only on its own query and keys (--enable-deterministic-inference). Raises ValueError where
        the backend cannot."""
        raise ValueError(f"the {self.name} attention backend has no batch-invariant mode")

    def select_shared_prefixes(
        self, spans: list[SharedPrefix], slices: list[Slice]
    ) -> list[SharedPrefix]:
        """The spans of a Step (over its `slices`) this backend attends once per group: all of
        them where it supports shared prefixes, none otherwise. Rows left out of every span
        attend their whole prefix as their own keys, with the same result."""
        return spans if self.supports_shared_prefixes else []

    def warmup_shared_prefixes(self, dtype: torch.dtype, pad_row: int) -> None:
        """Runs once, at the engine's warm-up, whatever the shared-prefix path compiles on first
        use, for queries of `dtype`, reading only slot 0 through table row `pad_row`. Nothing to
        do here."""

    def init_metadata(self, batch: ForwardBatch) -> None:
        """Builds per-step metadata shared by all layers into `batch.attn_metadata`."""

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] → out: [T, H, D]
        self.pool.store(layer, batch.out_cache_loc, k, v)
        if batch.shared is not None:
            return self._forward_shared(layer, q, batch)
        n_ext = batch.num_extend_tokens
        if batch.num_decode == 0:
            return self.extend(layer, q, batch)
        if batch.num_extend == 0:
            return self.decode(layer, q, batch)
        return torch.cat(
            [self.extend(layer, q[:n_ext], batch), self.decode(layer, q[n_ext:], batch)]
        )

    def _forward_shared(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q: [T, H, D]. Every slice over its own keys (all of them when ungrouped), then each
        # group's tokens over its shared span, merged by log-sum-exp: [T, H, D] float32 → q.dtype.
        n_ext, parts = batch.num_extend_tokens, []
        if batch.num_extend:
            parts.append(self.extend_tail(layer, q[:n_ext], batch))
        if batch.num_decode:
            parts.append(self.decode_tail(layer, q[n_ext:], batch))
        out, lse = parts[0]
        if len(parts) == 2:
            out, lse = torch.cat([out, parts[1][0]]), torch.cat([lse, parts[1][1]])
        shared = batch.shared
        assert shared is not None
        part_out, part_lse = self.shared_prefix(layer, q.index_select(0, shared.tok_idx), batch)
        return self.merge(out, lse, part_out, part_lse, shared.tok_idx).to(q.dtype)

    def extend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def extend_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend tokens over keys key_starts .. their position: out [T_ext, H, D], lse [T_ext, H]
        (float32)."""
        raise NotImplementedError

    def decode_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode tokens over keys key_starts .. seq_len-1: out [B, H, D], lse [B, H] (float32)."""
        raise NotImplementedError

    def shared_prefix(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [N, H, D], the tokens `batch.shared.tok_idx` over their group's span: out [N, H, D],
        lse [N, H] (float32)."""
        raise NotImplementedError

    def merge(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        part_out: torch.Tensor,
        part_lse: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        """out [T, H, D] with the partial attention of tokens idx [N] merged in (float32)."""
        raise NotImplementedError

    def decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError

    def _pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V pools ([slots, Hkv, D]) and the request→slot table."""
        return self.pool.k[layer], self.pool.v[layer], self.table.table


def create_backend(name: str, **kwargs: object) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}"
        )
    return ATTENTION_BACKENDS[name](**kwargs)  # type: ignore[arg-type]
