"""Attention through the Triton kernels of `kernels/` (the CUDA default).

K/V are stored by `store_kv`; the extend part runs `extend_attention` (cached prefix + new tokens,
causal) and the decode part `decode_attention` (flash-decoding over the table). Both kernels read
each request's lengths from device tensors, so the decode part has no shape that depends on the
lengths: the static-shape decode runner captures it once per batch size.

Rows that share a cached prefix (`batch.shared`, the spans `select_shared_prefixes` keeps) attend
it once per group: `shared_prefix_attention` reads each group's span for all its tokens, the
`*_lse` kernels each row's own keys after it, and `merge_attention_states_` combines the two by
log-sum-exp (the cascade of `AttentionBackend._forward_shared`).

Importing this module does not import Triton: the kernels are imported when a backend is built.
Triton fixes, per kernel, whether it is compiled or interpreted (TRITON_INTERPRET) when the
kernel's module is imported; importing the executor must not make that choice for its caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.attention.base import (
    AttentionBackend,
    decode_groups,
    register,
    shared_prefix_mode,
)
from services.executor.forward_batch import ForwardBatch, SharedSpans
from services.executor.kv_pool import KVPool, RequestToTokenTable
from services.executor.step import SharedPrefix, Slice

SHARED_PREFIX_ENV = "RADIXSERVE_TRITON_SHARED_PREFIX"
# The auto rule keeps a span's decode rows when at least this many share at least this many
# positions (one key block of the span kernel): fewer rows or positions save little reading and
# add the span and merge launches.
SPAN_MIN_ROWS = 2
SPAN_MIN_LENGTH = 64


@dataclass
class ExtendPart:
    rows: torch.Tensor  # [E] table rows
    prefix_lens: torch.Tensor  # [E] cached tokens before each request's new ones
    extend_lens: torch.Tensor  # [E] new tokens per request
    qo_start: torch.Tensor  # [E] first row of each request in the extend part of q
    max_extend_len: int
    key_starts: torch.Tensor | None = None  # [E] first own key after a shared span (cascade)


@dataclass
class DecodePart:
    rows: torch.Tensor  # [B] table rows
    seq_lens: torch.Tensor  # [B] keys per request, the new token included
    key_starts: torch.Tensor | None = None  # [B] first own key after a shared span (cascade)


@dataclass
class TritonMetadata:
    extend: ExtendPart | None
    decode: DecodePart | None
    shared: SharedSpans | None = None


@register("triton")
class TritonAttention(AttentionBackend):
    # Split-K chunks of the decode kernel: enough programs for a small batch of long sequences.
    num_kv_splits = 8
    supports_shared_prefixes = True

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
        # see the module doc
        from kernels import (
            decode_attention,
            extend_attention,
            kv_store,
            merge_attention_states,
            shared_prefix_attention,
        )

        self._store_kv = kv_store.store_kv
        self._extend_attention = extend_attention.extend_attention
        self._extend_attention_lse = extend_attention.extend_attention_lse
        self._decode_attention = decode_attention.decode_attention
        self._decode_attention_lse = decode_attention.decode_attention_lse
        self._shared_prefix_attention = shared_prefix_attention.shared_prefix_attention
        self._merge = merge_attention_states.merge_attention_states_
        self.shared_prefix_mode = shared_prefix_mode(SHARED_PREFIX_ENV)

    def select_shared_prefixes(
        self, spans: list[SharedPrefix], slices: list[Slice]
    ) -> list[SharedPrefix]:
        """The spans attended once per group. The default (auto) keeps, per span, its rows that
        decode one token, where at least SPAN_MIN_ROWS of them share at least SPAN_MIN_LENGTH
        positions, and none in a pure-decode step that a captured CUDA graph replays (the graph
        holds the plain decode kernel). The extend kernel already reads each key once per block
        of 64 query rows (32 where a row of q exceeds 256 bytes), so extend rows gain little.
        RADIXSERVE_TRITON_SHARED_PREFIX=always keeps every span as the scheduler sent it, =never
        none."""
        if self.shared_prefix_mode == "always":
            return spans
        if self.shared_prefix_mode == "never":
            return []
        if all(s.length == 1 for s in slices) and len(slices) <= self.graph_decode_rows:
            return []
        return decode_groups(spans, slices, SPAN_MIN_ROWS, SPAN_MIN_LENGTH)

    def init_metadata(self, batch: ForwardBatch) -> None:
        ne, shared = batch.num_extend, batch.shared
        extend = self._extend_part(batch) if ne else None
        decode = DecodePart(batch.rows[ne:], batch.seq_lens[ne:]) if batch.num_decode else None
        if shared is not None:
            if extend is not None:
                extend.key_starts = shared.key_starts[:ne]
            if decode is not None:
                decode.key_starts = shared.key_starts[ne:]
        batch.attn_metadata = TritonMetadata(extend, decode, shared)

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

    # --- Shared prefixes (batch.shared) -----------------------------------------------------------

    def extend_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.attn_metadata.extend  # type: ignore[union-attr]
        assert part.key_starts is not None
        return self._extend_attention_lse(
            q, *self._pools(layer), part.rows, part.key_starts, part.prefix_lens,
            part.extend_lens, part.qo_start, self.scale, max_extend_len=part.max_extend_len,
        )  # fmt: skip

    def decode_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.attn_metadata.decode  # type: ignore[union-attr]
        assert part.key_starts is not None
        return self._decode_attention_lse(
            q, *self._pools(layer), part.rows, part.key_starts, part.seq_lens, self.scale,
            num_kv_splits=self.num_kv_splits,
        )  # fmt: skip

    def shared_prefix(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spans = batch.attn_metadata.shared  # type: ignore[union-attr]
        return self._shared_prefix_attention(
            q, *self._pools(layer), spans.rows, spans.tok_offsets, spans.lens, self.scale,
            max_tokens_per_group=spans.max_group_tokens,
        )  # fmt: skip

    def merge(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        part_out: torch.Tensor,
        part_lse: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        return self._merge(out, lse, part_out, part_lse, idx)

    def warmup_shared_prefixes(self, dtype: torch.dtype, pad_row: int) -> None:
        """Compiles the span, own-keys and merge kernels for queries of `dtype` (Triton compiles
        a kernel at its first launch: without this, the first Step with spans would stall every
        running request for as long). Every key read is slot 0 through the all-zero table row
        `pad_row`; nothing is written to the pool."""
        if self.shared_prefix_mode == "never":
            return
        device = self.table.table.device

        def index(*values: int) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        q = torch.zeros(2, self.num_heads, self.head_dim, dtype=dtype, device=device)
        k, v, table = self._pools(0)
        rows, one, two = index(pad_row, pad_row), index(1, 1), index(2, 2)
        out, lse = self._decode_attention_lse(
            q, k, v, table, rows, one, two, self.scale, num_kv_splits=self.num_kv_splits
        )
        self._extend_attention_lse(
            q, k, v, table, rows[:1], one[:1], one[:1], two[:1], index(0), self.scale,
            max_extend_len=2,
        )  # fmt: skip
        part_out, part_lse = self._shared_prefix_attention(
            q, k, v, table, rows[:1], index(0, 2), one[:1], self.scale, max_tokens_per_group=2
        )
        self._merge(out, lse, part_out, part_lse, index(0, 1))

    # --- Static-shape decode (services/executor/decode_runner.py) ---------------------------------

    def static_kv_len(self, max_seq_len: int) -> int:
        """The decode kernel's shapes do not depend on the lengths: one layout per batch size."""
        return 0

    def init_static_decode(self, batch: ForwardBatch, kv_len: int) -> None:
        """Decode metadata that only views `batch`'s buffers (safe to capture in a CUDA graph)."""
        batch.attn_metadata = TritonMetadata(None, DecodePart(batch.rows, batch.seq_lens))
