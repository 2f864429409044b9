"""Attention through the Triton kernels of `kernels/` (the CUDA default).

K/V are stored by `store_kv`; the extend part runs `extend_attention` (cached prefix + new tokens,
causal) and the decode part `decode_attention` (flash-decoding over the table). Both kernels read
each request's lengths from device tensors, so the decode part has no shape that depends on the
lengths: the static-shape decode runner captures it once per batch size.

Importing this module does not import Triton: the kernels are imported when a backend is built.
Triton fixes, per kernel, whether it is compiled or interpreted (TRITON_INTERPRET) when the
kernel's module is imported; importing the executor must not make that choice for its caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.attention.base import AttentionBackend, register
from services.executor.forward_batch import ForwardBatch
from services.executor.kv_pool import KVPool, RequestToTokenTable


@dataclass
class ExtendPart:
    rows: torch.Tensor  # [E] table rows
    prefix_lens: torch.Tensor  # [E] cached tokens before each request's new ones
    extend_lens: torch.Tensor  # [E] new tokens per request
    qo_start: torch.Tensor  # [E] first row of each request in the extend part of q
    max_extend_len: int


@dataclass
class DecodePart:
    rows: torch.Tensor  # [B] table rows
    seq_lens: torch.Tensor  # [B] keys per request, the new token included


@dataclass
class TritonMetadata:
    extend: ExtendPart | None
    decode: DecodePart | None


@register("triton")
class TritonAttention(AttentionBackend):
    # Split-K chunks of the decode kernel: enough programs for a small batch of long sequences.
    num_kv_splits = 8

    def __init__(
        self,
        pool: KVPool,
        table: RequestToTokenTable,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sliding_window: int | None = None,
    ) -> None:
        if sliding_window is not None and sliding_window < table.context_length:
            raise ValueError(
                f"the triton attention backend has no sliding-window kernels (window {sliding_window} "
                f"< context {table.context_length}); use --attention-backend torch or a "
                "--context-length within the window"
            )
        super().__init__(pool, table, num_heads, num_kv_heads, head_dim, sliding_window=None)
        from kernels import decode_attention, extend_attention, kv_store  # see the module doc

        self._store_kv = kv_store.store_kv
        self._extend_attention = extend_attention.extend_attention
        self._decode_attention = decode_attention.decode_attention

    def init_metadata(self, batch: ForwardBatch) -> None:
        ne = batch.num_extend
        extend = self._extend_part(batch) if ne else None
        decode = DecodePart(batch.rows[ne:], batch.seq_lens[ne:]) if batch.num_decode else None
        batch.attn_metadata = TritonMetadata(extend, decode)

    def _extend_part(self, batch: ForwardBatch) -> ExtendPart:
        ne = batch.num_extend
        lens = torch.tensor(batch.extend_lens_cpu, dtype=torch.int64, device=batch.rows.device)
        qo_start = torch.cumsum(lens, 0) - lens  # exclusive prefix sum
        return ExtendPart(
            batch.rows[:ne], batch.starts[:ne], lens, qo_start, max(batch.extend_lens_cpu)
        )

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hkv, D] → out: [T, H, D]
        self._store_kv(k, v, self.pool.k[layer], self.pool.v[layer], batch.out_cache_loc)
        n_ext = batch.num_extend_tokens
        if batch.num_decode == 0:
            return self.extend(layer, q, batch)
        if batch.num_extend == 0:
            return self.decode(layer, q, batch)
        return torch.cat(
            [self.extend(layer, q[:n_ext], batch), self.decode(layer, q[n_ext:], batch)]
        )

    def extend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        part = batch.attn_metadata.extend  # type: ignore[union-attr]
        return self._extend_attention(
            q,
            self.pool.k[layer],
            self.pool.v[layer],
            self.table.table,
            part.rows,
            part.prefix_lens,
            part.extend_lens,
            part.qo_start,
            self.scale,
            max_extend_len=part.max_extend_len,
        )

    def decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        part = batch.attn_metadata.decode  # type: ignore[union-attr]
        return self._decode_attention(
            q,
            self.pool.k[layer],
            self.pool.v[layer],
            self.table.table,
            part.rows,
            part.seq_lens,
            self.scale,
            num_kv_splits=self.num_kv_splits,
        )

    # --- Static-shape decode (services/executor/decode_runner.py) ---------------------------------

    def static_kv_len(self, max_seq_len: int) -> int:
        """The decode kernel's shapes do not depend on the lengths: one layout per batch size."""
        return 0

    def init_static_decode(self, batch: ForwardBatch, kv_len: int) -> None:
        """Decode metadata that only views `batch`'s buffers (safe to capture in a CUDA graph)."""
        batch.attn_metadata = TritonMetadata(None, DecodePart(batch.rows, batch.seq_lens))
