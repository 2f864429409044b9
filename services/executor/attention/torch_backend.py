"""Attention in plain PyTorch, for any device (the CPU default).

Each part of a step (extend, decode) is one padded, masked `scaled_dot_product_attention` call over
all its requests: keys are gathered from the pool through the table into [B, L, Hkv, D], and a
boolean mask hides positions past each request's length (and outside a sliding window).

Shared prefixes (`batch.shared`): the C++ kernels of kernels/cpu/cascade.py, or, without a
compiler, the same padded layout with masks that also hide each slice's shared positions and a
log-sum-exp kept for the merge. Where the AMX attention kernel runs, groups of decode rows attend
their span and their own keys in one call (`KernelCascadeDecode`, `cascade_decode`); on CPUs with
AVX2 but no AVX-512, so do they through the decode kernel's grouped form
(`grouped_decode_attention`), which reads each span once and gives the plain kernel's outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import kernels.cpu as cpu_kernels
from kernels.cpu import cascade
from kernels.cpu.build import cpu_flags, disabled_by_env
from services.executor.attention.base import (
    AttentionBackend,
    decode_groups,
    register,
    shared_prefix_mode,
)
from services.executor.forward_batch import ForwardBatch, SharedSpans
from services.executor.step import SharedPrefix, Slice

# Where the C++ kernels run, the least decode rows and positions for which a shared span is
# attended once per group (see TorchAttention.select_shared_prefixes).
SPAN_MIN_ROWS = 8
SPAN_MIN_LENGTH = 2048
# The same where the AMX kernel runs decode groups in one call (TorchAttention.amx_cascade; see
# TorchAttention.select_shared_prefixes for the measurements).
AMX_SPAN_MIN_ROWS = 3
AMX_SPAN_MIN_LENGTH = 768
# The same where the AVX2 decode kernel runs decode groups in one call (TorchAttention.
# grouped_decode; see TorchAttention.select_shared_prefixes).
GROUPED_SPAN_MIN_ROWS = 2
GROUPED_SPAN_MIN_LENGTH = 256


@dataclass
class PaddedPart:
    kv_idx: torch.Tensor  # [B, L] KV slots of each request's positions 0..L-1
    mask: torch.Tensor  # [B, 1, Q, L] True where a query may attend a key
    token_dest: torch.Tensor | None  # [T_part] index into the flattened [B * Q] query grid
    max_q: int
    # No request has a cached prefix (and no sliding window): query i of every request sees keys
    # 0..i, which is SDPA's own causal mask over the right-padded grid, so the kernel can skip the
    # blocks above the diagonal instead of reading a mask. Padded queries are discarded anyway.
    causal: bool = False


@dataclass
class TorchMetadata:
    extend: PaddedPart | KernelExtend | None
    decode: PaddedPart | KernelDecode | None
    shared: PaddedPart | SharedSpans | None = None  # the groups' spans, when batch.shared


@dataclass
class KernelExtend:
    rows: torch.Tensor  # [B] table rows of the extend requests
    prefix_lens: torch.Tensor  # [B] cached tokens before each request's new ones
    extend_lens: torch.Tensor  # [B] new tokens per request (q holds them back to back)
    key_starts: torch.Tensor | None = None  # [B] first key position read (shared prefixes)


@dataclass
class KernelDecode:
    rows: torch.Tensor  # [B] table rows of the decode requests
    seq_lens: torch.Tensor  # [B] keys per request, positions 0 .. seq_len-1
    key_starts: torch.Tensor | None = None  # [B] first key position read (shared prefixes)


@dataclass
class KernelCascadeDecode(KernelDecode):
    """Decode rows with shared prefixes, for the AMX kernel (`cascade_decode_attention`) or the
    AVX2 decode kernel's grouped form (`grouped_decode_attention`): the rows order[offsets[g] :
    offsets[g + 1]] (indices into the decode rows) share their first spans[g] positions and read
    them once per group; `single` ([n] or None) the rows in no group, which the AMX path runs
    through the decode kernel (single_rows, single_lens: theirs)."""

    order: torch.Tensor | None = None  # [N] int64
    offsets: torch.Tensor | None = None  # [G + 1] int64
    spans: torch.Tensor | None = None  # [G] int64
    single: torch.Tensor | None = None  # [B - N] int64
    single_rows: torch.Tensor | None = None
    single_lens: torch.Tensor | None = None


@register("torch")
class TorchAttention(AttentionBackend):
    batch_invariant = False  # --enable-deterministic-inference: see make_batch_invariant

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.use_cpu_kernel = self._cpu_kernel_usable()
        sdpa_extend = self.use_cpu_kernel and self._sdpa_extend_faster()
        # The extend kernel keeps 64 output floats of a row in registers at a time.
        self.use_cpu_extend_kernel = (
            self.use_cpu_kernel and self.head_dim % 64 == 0 and not sdpa_extend
        )
        # Where torch's SDPA runs the extend part (AMX), each row's plain attention is faster
        # than splitting off the shared span and merging, so the engine drops the spans.
        self.supports_shared_prefixes = not self.sliding_window and not sdpa_extend
        # bfloat16 pools on CPUs whose AMX attention kernel runs: pure-decode groups attend their
        # spans and their own keys in one call (cascade_decode_attention).
        self.amx_cascade = (
            self.use_cpu_extend_kernel and self.supports_shared_prefixes and self._amx_attention()
        )
        self.cpu_shared_prefix = shared_prefix_mode("RADIXSERVE_CPU_SHARED_PREFIX")
        self.avx512 = "avx512f" in cpu_flags().split()
        # Without AVX-512 (the AVX2 kernels), pure-decode groups run in one call per layer that
        # reads each span once for up to 8 of a group's rows and gives each row the decode
        # kernel's own outputs (grouped_decode_attention); spans attended apart and merged
        # measured slower there than each row's own decode (see select_shared_prefixes).
        self.grouped_decode = (
            self.use_cpu_extend_kernel
            and self.supports_shared_prefixes
            and not self.amx_cascade
            and cascade.reads_spans_once(self.head_dim)
        )

    def select_shared_prefixes(
        self, spans: list[SharedPrefix], slices: list[Slice]
    ) -> list[SharedPrefix]:
        """With the C++ kernels, a span keeps only its rows that decode one token, and only when
        there are at least SPAN_MIN_ROWS of them over at least SPAN_MIN_LENGTH positions; the
        padded PyTorch path keeps every span.

        The kernels compute the same products either way: the span kernel's gain is reading the
        span once for many rows' queries where the decode kernel reads it once per row. An
        extend's blocks already read each key once for 16 tokens (32 on AMX), so its rows gain
        nothing and pay the merge. `radixserve bench-executor` decode steps, bfloat16, AVX-512
        EPYC, with spans against without (`shared-prefix` against `shared-prefix-plain`):

        - 1,000 positions: 4 groups of 2 or 4 rows 28.1 / 30.0 ms against 19.6 / 24.7; one group
          of 16 or 32 rows 25.6 / 35.7 against 23.1 / 33.5 (the span stays in cache);
        - 2,000 positions: 4 groups of 4 rows 47.4 against 39.7; of 8 rows 63.4 against 66.4;
          one group of 32 rows 44.6 against 50.1;
        - 4,000 positions: 4 groups of 4 rows 65.0 against 55.4; of 8 rows 103.5 against 121.2;
          one group of 32 rows 62.9 against 75.5.

        Serving the shared-prefix workload of docs/benchmarks.md (1,000-token system prompts,
        about 4 rows per group), every span kept gave 264 output tok/s, none 302.

        Where the AMX kernel runs the decode groups (`amx_cascade`: each group's span and its
        members' own keys in one call per layer), the rule is AMX_SPAN_MIN_ROWS rows over
        AMX_SPAN_MIN_LENGTH positions. Measured the same way on a 2-vCPU Xeon with AMX: over
        1,000 positions, groups of 4 rows 26.0 ms against 27.9 (16 rows), of 3 rows 39.3 against
        42.0 (24 rows), of 4 rows at 32 rows 41.6 against 46.0, but of 2 rows 34.9 against 31.6
        (16 rows); groups of 4 rows over 500 positions 22.8 against 22.7, over 200 positions
        20.3 against 18.2. With the members' own keys on vector code (batch 16, two runs each):
        4 rows over 1,000 positions 27.5 / 28.1 against 30.8 / 30.9, 2 rows 36.4 / 34.2 against
        35.5 / 33.5, 4 rows over 500 positions 23.8 / 22.5 against 23.9 / 23.9, over 200
        positions 22.0 / 20.8 against 20.0 / 19.5.

        On CPUs without AVX-512 (the AVX2 kernels) a span attended apart and merged measured
        slower than each row's own decode (a 2-vCPU AMD EPYC, Zen 3, float32, batch 16, in one
        process alternating with and without the spans, medians of five: 4 groups of 4 rows
        over 1,000 positions 89.2 ms against 78.2, one group of 16 rows 82.0 against 70.9, 2
        groups of 8 rows over 2,048 positions 110.3 against 101.3), since a group's rows read
        the same slots, which stay in cache for the plain decode kernel. There the decode rows
        of a group run in one call instead (`grouped_decode`: grouped_decode_attention, the
        decode kernel's own outputs, with each span read once from memory and each block of it
        once from L1 for up to 8 members), under the rule GROUPED_SPAN_MIN_ROWS rows over
        GROUPED_SPAN_MIN_LENGTH positions. 30 layers of the kernel alone on that host
        (`python -m kernels.cpu.bench --shared-prefix-groups G --shared-prefix-len P`), 16 rows
        with 96 own positions each after their group's span, float32, medians of 11 rounds: 4
        groups of 4 over 1,000 positions 23.8 ms against 37.7 for the decode kernel, 8 groups of
        2 33.1 against 50.2, one group 17.3 against 22.0; 4 groups over 256 positions 9.8
        against 11.1, over 64 6.4 against 6.1.

        RADIXSERVE_CPU_SHARED_PREFIX=always keeps every span as the scheduler sent it (all rows,
        any length), =never drops them all; the default, auto, is the rule above."""
        mode = self.cpu_shared_prefix
        if not self.supports_shared_prefixes or not self.use_cpu_extend_kernel or mode == "always":
            return super().select_shared_prefixes(spans, slices)
        if mode == "never":
            return []
        if self.amx_cascade:
            min_rows, min_length = AMX_SPAN_MIN_ROWS, AMX_SPAN_MIN_LENGTH
        elif self.grouped_decode:
            min_rows, min_length = GROUPED_SPAN_MIN_ROWS, GROUPED_SPAN_MIN_LENGTH
        elif self.avx512:
            min_rows, min_length = SPAN_MIN_ROWS, SPAN_MIN_LENGTH
        else:
            return []
        return decode_groups(spans, slices, min_rows, min_length)

    def _sdpa_extend_faster(self) -> bool:
        """Whether extend attention runs faster in torch's SDPA than in the C++ extend kernels
        (`radixserve bench-executor` prefill steps):

        - CPUs with AMX, in bfloat16, where the AMX kernel (attention_amx.cpp) runs: the kernel
          (on a 2-vCPU Xeon, medians of three: 1 x 64 tokens after a cached 1,000-token prefix
          in 41.3 ms against 49.4, 16 x 64 in 360 against 471, 4 x 512 in 417 against 460);
        - CPUs with AMX, in bfloat16, without it (not built, or tiles refused): SDPA (4 x 512
          tokens in 706 ms against 979 ms for the AVX-512 kernel);
        - CPUs with AVX-512 but no AMX: the kernel (464 against 703 ms for 7 x 80 tokens over a
          cached 1,000-token prefix, bfloat16, `radixserve bench-executor --prefill-len 80
          --prefill-cached-len 1000 --prefill-prompts 7`);
        - CPUs with AVX2, FMA and F16C but no AVX-512, at head dim 64: the kernel (its AVX2
          extend, extend_block_avx2; float32 on a 2-vCPU AMD EPYC Zen 3, medians of three: 7 x 64
          tokens after a cached 1,000-token prefix in 928 ms against 1,169, 1 x 64 after it in
          169 against 188, 4 x 256 in 1,524 against 1,778);
        - other CPUs and head dims: SDPA (the kernel's portable loops: 7 x 64 tokens after a
          cached 1,000 in 3.6 s against 1.1 s on that host).

        RADIXSERVE_CPU_EXTEND_ATTENTION=kernel|sdpa overrides the choice."""
        choice = os.environ.get("RADIXSERVE_CPU_EXTEND_ATTENTION", "auto")
        if choice in ("kernel", "sdpa"):
            return choice == "sdpa"
        if choice != "auto":
            raise ValueError(f"RADIXSERVE_CPU_EXTEND_ATTENTION={choice!r}: use auto, kernel, sdpa")
        flags = cpu_flags().split()
        if "avx512f" not in flags:  # the AVX2 kernel takes head dim 64 only
            return not cpu_kernels.avx2_attention(self.head_dim)
        if self.pool.k[0].dtype != torch.bfloat16 or "amx_bf16" not in flags:
            return False
        return not self._amx_attention()

    def _amx_attention(self) -> bool:
        """Whether the AMX attention kernel takes queries of the pool's dtype over the pool. (A
        float32 model over a bfloat16 pool, which is rare, runs the AVX-512 extend kernel and
        each row's plain decode attention instead.)"""
        pool = self.pool.k[0]
        probe = torch.empty(0, self.num_heads, self.head_dim, dtype=pool.dtype)
        return cpu_kernels.amx_module(probe, pool) is not None

    def _cpu_kernel_usable(self) -> bool:
        pool = self.pool.k[0] if self.pool.k else None
        if pool is None or pool.device.type != "cpu" or self.sliding_window:
            return False
        if pool.dtype not in {kv for _, kv in cpu_kernels.KERNEL_DTYPES}:
            return False
        if disabled_by_env():
            return False
        return cpu_kernels.load() is not None

    def make_batch_invariant(self) -> None:
        """Every token, extend or decode, runs through the C++ decode kernel over keys 0 .. its
        own position: the kernel's arithmetic for one (token, head) depends only on that token's
        query and keys, never on the batch, the task split or whether the token came in a prefill
        chunk, so a prefix computed in any step, chunked or cached, holds the same K/V and gives
        the same outputs. Shared-prefix spans (a different summation order) are not used."""
        if not self.use_cpu_kernel:
            raise ValueError(
                "--enable-deterministic-inference needs the CPU attention kernels (device cpu, "
                "float32 or bfloat16, no sliding window, a C++ compiler)"
            )
        self.batch_invariant = True
        self.supports_shared_prefixes = False

    def init_metadata(self, batch: ForwardBatch) -> None:
        if self.batch_invariant:
            batch.attn_metadata = TorchMetadata(None, self._per_token_part(batch))
            return
        if batch.shared is not None:
            decode_only = int(batch.shared.tok_idx.min()) >= batch.num_extend_tokens
            if (self.amx_cascade or self.grouped_decode) and decode_only:
                batch.attn_metadata = self._cascade_metadata(batch, batch.shared)
            else:
                batch.attn_metadata = self._shared_metadata(batch, batch.shared)
            return
        ne = batch.num_extend
        extend: PaddedPart | KernelExtend | None = None
        if ne:
            extend = (
                self._kernel_extend(batch)
                if self.use_cpu_extend_kernel
                else self._extend_part(batch)
            )
        decode: PaddedPart | KernelDecode | None = None
        if batch.num_decode:
            decode = self._kernel_part(batch) if self.use_cpu_kernel else self._decode_part(batch)
        batch.attn_metadata = TorchMetadata(extend, decode)

    def _shared_metadata(self, batch: ForwardBatch, shared: SharedSpans) -> TorchMetadata:
        ne, starts = batch.num_extend, shared.key_starts
        extend: PaddedPart | KernelExtend | None = None
        if ne and self.use_cpu_extend_kernel:
            extend = replace(self._kernel_extend(batch), key_starts=starts[:ne].contiguous())
        elif ne:
            extend = self._extend_part(batch, starts[:ne])
        decode: PaddedPart | KernelDecode | None = None
        if batch.num_decode and self.use_cpu_kernel:
            decode = replace(self._kernel_part(batch), key_starts=starts[ne:].contiguous())
        elif batch.num_decode:
            decode = self._decode_part(batch, starts[ne:])
        spans = shared if self.use_cpu_extend_kernel else self._shared_part(shared)
        return TorchMetadata(extend, decode, spans)

    def _cascade_metadata(self, batch: ForwardBatch, shared: SharedSpans) -> TorchMetadata:
        """Spans of decode rows only (the AMX and AVX2 rules keep no others): extends as without
        spans, the decode rows by groups (KernelCascadeDecode)."""
        first, device = batch.num_extend_tokens, batch.rows.device
        tokens, offsets = shared.tok_idx.tolist(), shared.tok_offsets.tolist()
        order = [t - first for t in tokens]
        grouped = set(order)
        single = [b for b in range(batch.num_decode) if b not in grouped]
        plain = self._kernel_part(batch)
        decode = KernelCascadeDecode(
            plain.rows,
            plain.seq_lens,
            order=torch.tensor(order, dtype=torch.int64, device=device),
            offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
            spans=shared.lens.contiguous(),
        )
        if single:
            idx = torch.tensor(single, dtype=torch.int64, device=device)
            decode.single = idx
            decode.single_rows = plain.rows[idx].contiguous()
            decode.single_lens = plain.seq_lens[idx].contiguous()
        extend = self._kernel_extend(batch) if batch.num_extend else None
        return TorchMetadata(extend, decode)

    def cascade_decode(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, part: KernelCascadeDecode
    ) -> torch.Tensor:
        """q: [B, H, D], the decode rows → [B, H, D] in q's dtype: the groups through the AMX
        kernel (bfloat16 out), each span read once per group (16 members at a time), and the rows
        in no group through the decode kernel. Queries the AMX kernel does not take (a float32
        model over a bfloat16 pool) run every row through the decode kernel, over all its keys.
        With `grouped_decode` (AVX2), every row in one call of grouped_decode_attention, whose
        outputs are the decode kernel's."""
        table = self.table.table
        if self.grouped_decode:
            return cpu_kernels.load().grouped_decode_attention(  # type: ignore[union-attr]
                q.contiguous(), k_pool, v_pool, table, part.rows, part.seq_lens, part.order,
                part.offsets, part.spans, self.scale,
            )  # fmt: skip
        module = cpu_kernels.amx_module(q, k_pool)
        if module is None:
            return cpu_kernels.paged_decode_attention(
                q, k_pool, v_pool, table, part.rows, part.seq_lens, self.scale
            )
        out = module.cascade_decode_attention(
            q.contiguous(), k_pool, v_pool, table, part.rows, part.seq_lens, part.order,
            part.offsets, part.spans, self.scale,
        )  # fmt: skip
        if part.single is not None:
            out[part.single] = cpu_kernels.paged_decode_attention(
                q[part.single],
                k_pool,
                v_pool,
                table,
                part.single_rows,
                part.single_lens,
                self.scale,
            )
        return out

    def _shared_part(self, shared: SharedSpans) -> PaddedPart:
        # Group g's tokens fill row g of a [G, max_n] query grid; all see keys 0 .. lens[g]-1.
        counts = shared.tok_offsets.diff()
        max_n, max_len = int(counts.max()), int(shared.lens.max())
        device = counts.device
        group_of_tok = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
        offset = torch.arange(int(shared.tok_offsets[-1]), device=device)
        dest = group_of_tok * max_n + offset - shared.tok_offsets[:-1][group_of_tok]
        mask = torch.arange(max_len, device=device)[None, :] < shared.lens[:, None]  # [G, L]
        mask = mask[:, None, None, :].expand(-1, 1, max_n, -1)
        return PaddedPart(self._gather_idx(shared.rows, max_len), mask, dest, max_n)

    def _per_token_part(self, batch: ForwardBatch) -> KernelDecode:
        """Every token as a decode query: its request's table row, keys 0 .. its position."""
        ne, rows = batch.num_extend, batch.rows
        if ne:
            lens = torch.tensor(batch.extend_lens_cpu, device=rows.device)
            rows = torch.cat([rows[:ne].repeat_interleave(lens), rows[ne:]])
        return KernelDecode(rows.contiguous(), (batch.positions + 1).contiguous())

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        part = getattr(batch.attn_metadata, "decode", None)
        if isinstance(part, KernelCascadeDecode):
            self.pool.store(layer, batch.out_cache_loc, k, v)
            n = batch.num_extend_tokens
            out = self.cascade_decode(q[n:], self.pool.k[layer], self.pool.v[layer], part)
            return torch.cat([self.extend(layer, q[:n], batch), out]) if n else out
        if not self.batch_invariant:
            return super().forward(layer, q, k, v, batch)
        self.pool.store(layer, batch.out_cache_loc, k, v)
        return self.decode(layer, q, batch)

    def _kernel_part(self, batch: ForwardBatch) -> KernelDecode:
        ne = batch.num_extend
        return KernelDecode(batch.rows[ne:].contiguous(), batch.seq_lens[ne:].contiguous())

    def _kernel_extend(self, batch: ForwardBatch) -> KernelExtend:
        ne = batch.num_extend
        lens = torch.tensor(batch.extend_lens_cpu, device=batch.rows.device)
        return KernelExtend(batch.rows[:ne].contiguous(), batch.starts[:ne].contiguous(), lens)

    def _gather_idx(self, rows: torch.Tensor, max_len: int) -> torch.Tensor:
        return self.table.table[rows, :max_len]

    def _decode_part(
        self, batch: ForwardBatch, key_starts: torch.Tensor | None = None
    ) -> PaddedPart:
        ne = batch.num_extend
        rows, seq_lens = batch.rows[ne:], batch.seq_lens[ne:]
        max_len = max(batch.seq_lens_cpu[ne:])
        key_pos = torch.arange(max_len, device=rows.device)
        mask = key_pos[None, :] < seq_lens[:, None]
        if key_starts is not None:
            mask &= key_pos[None, :] >= key_starts[:, None]
        if self.sliding_window:
            mask &= key_pos[None, :] >= seq_lens[:, None] - self.sliding_window
        return PaddedPart(self._gather_idx(rows, max_len), mask[:, None, None, :], None, 1)

    def _extend_part(
        self, batch: ForwardBatch, key_starts: torch.Tensor | None = None
    ) -> PaddedPart:
        ne = batch.num_extend
        rows, starts = batch.rows[:ne], batch.starts[:ne]
        lens = torch.tensor(batch.extend_lens_cpu, device=rows.device)
        max_q, max_len = max(batch.extend_lens_cpu), max(batch.seq_lens_cpu[:ne])
        device = rows.device
        # Padded query (b, i) sits at position starts[b] + i and sees keys 0 .. that position.
        q_pos = starts[:, None] + torch.arange(max_q, device=device)[None, :]
        key_pos = torch.arange(max_len, device=device)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]
        if self.sliding_window:
            mask &= key_pos[None, None, :] > q_pos[:, :, None] - self.sliding_window
        if key_starts is not None:
            mask &= key_pos[None, None, :] >= key_starts[:, None, None]
        req_of_tok = torch.repeat_interleave(torch.arange(ne, device=device), lens)
        first_tok = torch.cumsum(lens, 0) - lens
        offset = torch.arange(batch.num_extend_tokens, device=device) - first_tok[req_of_tok]
        dest = req_of_tok * max_q + offset
        causal = (
            not self.sliding_window
            and key_starts is None
            and batch.seq_lens_cpu[:ne] == batch.extend_lens_cpu
        )
        return PaddedPart(self._gather_idx(rows, max_len), mask[:, None], dest, max_q, causal)

    def _attend(self, layer: int, q: torch.Tensor, part: PaddedPart) -> torch.Tensor:
        # q: [B, H, Q, D] → [B, H, Q, D]
        b, n_keys = part.kv_idx.shape
        flat = part.kv_idx.reshape(-1)
        k = self.pool.k[layer].index_select(0, flat).view(b, n_keys, self.num_kv_heads, -1)
        v = self.pool.v[layer].index_select(0, flat).view(b, n_keys, self.num_kv_heads, -1)
        k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
        if part.causal:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
            )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=part.mask, scale=self.scale, enable_gqa=True
        )

    def extend(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        part = batch.attn_metadata.extend  # type: ignore[union-attr]
        if isinstance(part, KernelExtend):
            return cpu_kernels.extend_attention(
                q,
                self.pool.k[layer],
                self.pool.v[layer],
                self.table.table,
                part.rows,
                part.prefix_lens,
                part.extend_lens,
                self.scale,
            )
        b = part.kv_idx.shape[0]
        grid = q.new_zeros(b * part.max_q, self.num_heads, self.head_dim)
        grid[part.token_dest] = q
        grid = grid.view(b, part.max_q, self.num_heads, self.head_dim).transpose(1, 2)
        out = self._attend(layer, grid, part).transpose(1, 2).reshape(b * part.max_q, -1)
        return out[part.token_dest].view(-1, self.num_heads, self.head_dim)

    def decode(self, layer: int, q: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # One query per request: the CPU kernel reads K/V straight from the pool; otherwise two
        # batched matmuls in float32, which beat SDPA's CPU flash kernel (built for long queries).
        # q: [B, H, D] viewed as [B, Hkv, G, D].
        part = batch.attn_metadata.decode  # type: ignore[union-attr]
        if isinstance(part, KernelDecode):
            return cpu_kernels.paged_decode_attention(
                q,
                self.pool.k[layer],
                self.pool.v[layer],
                self.table.table,
                part.rows,
                part.seq_lens,
                self.scale,
            )
        b, n_keys = part.kv_idx.shape
        flat = part.kv_idx.reshape(-1)
        k = self.pool.k[layer].index_select(0, flat).view(b, n_keys, self.num_kv_heads, -1)
        v = self.pool.v[layer].index_select(0, flat).view(b, n_keys, self.num_kv_heads, -1)
        group = self.num_heads // self.num_kv_heads
        qg = q.view(b, self.num_kv_heads, group, self.head_dim).float()
        scores = torch.matmul(qg, k.permute(0, 2, 3, 1).float()) * self.scale  # [B, Hkv, G, L]
        scores.masked_fill_(~part.mask.view(b, 1, 1, n_keys), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v.transpose(1, 2).float())  # [B, Hkv, G, D]
        return out.view(b, self.num_heads, self.head_dim).to(q.dtype)

    # --- Shared prefixes (batch.shared) -----------------------------------------------------------

    def extend_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.attn_metadata.extend  # type: ignore[union-attr]
        if isinstance(part, KernelExtend):
            assert part.key_starts is not None
            return cascade.extend_attention_lse(
                q, *self._pools(layer), part.rows, part.key_starts, part.prefix_lens,
                part.extend_lens, self.scale,
            )  # fmt: skip
        return self._attend_lse(layer, q, part)

    def decode_tail(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.attn_metadata.decode  # type: ignore[union-attr]
        if isinstance(part, KernelDecode):
            assert part.key_starts is not None
            return cascade.paged_decode_attention_lse(
                q, *self._pools(layer), part.rows, part.key_starts, part.seq_lens, self.scale
            )
        return self._attend_lse(layer, q, part)

    def shared_prefix(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part = batch.attn_metadata.shared  # type: ignore[union-attr]
        if isinstance(part, SharedSpans):
            return cascade.shared_prefix_attention(
                q, *self._pools(layer), part.rows, part.tok_offsets, part.lens, self.scale
            )
        return self._attend_lse(layer, q, part)

    def merge(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        part_out: torch.Tensor,
        part_lse: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        if self.use_cpu_kernel:
            return cascade.merge_attention_states_(out, lse, part_out, part_lse, idx)
        return cascade.merge_attention_states_ref(out, lse, part_out, part_lse, idx)

    def _attend_lse(
        self, layer: int, q: torch.Tensor, part: PaddedPart
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], placed on the part's [B, Q] grid → out [T, H, D], lse [T, H] (float32).
        # Padded grid entries see no key (lse -inf, out NaN) and are dropped.
        b, n_keys = part.kv_idx.shape
        h, d, hkv = self.num_heads, self.head_dim, self.num_kv_heads
        grid = q
        if part.token_dest is not None:
            grid = q.new_zeros(b * part.max_q, h, d)
            grid[part.token_dest] = q
        qg = grid.view(b, part.max_q, hkv, h // hkv, d).float()
        flat = part.kv_idx.reshape(-1)
        k = self.pool.k[layer].index_select(0, flat).view(b, n_keys, hkv, d).float()
        v = self.pool.v[layer].index_select(0, flat).view(b, n_keys, hkv, d).float()
        scores = torch.einsum("bqkgd,blkd->bkgql", qg, k) * self.scale
        mask = part.mask.reshape(b, 1, 1, part.max_q, n_keys)
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Q]
        out = torch.einsum("bkgql,blkd->bqkgd", (scores - lse[..., None]).exp(), v)
        out, lse = out.reshape(-1, h, d), lse.permute(0, 3, 1, 2).reshape(-1, h)
        if part.token_dest is not None:
            out, lse = out[part.token_dest], lse[part.token_dest]
        return out, lse

    # --- Static-shape decode (services/executor/decode_runner.py) ---------------------------------
    # The eager decode pads keys to this step's longest sequence, a length that changes every step.
    # The static path pads to a length bucket instead, so a compiled or captured step keeps its
    # shapes for many steps; keys past a request's length are masked exactly as in `_decode_part`.

    def static_kv_len(self, max_seq_len: int) -> int:
        if self.use_cpu_kernel:
            return 0  # the kernel reads the lengths from the buffers: one layout per batch size
        return kv_len_bucket(max_seq_len, self.table.context_length)

    def init_static_decode(self, batch: ForwardBatch, kv_len: int) -> None:
        """Decode metadata of a pure-decode `batch` padded to `kv_len` keys, computed from its
        tensors alone (no host lengths), so it can run inside a compiled or captured step."""
        rows, seq_lens = batch.rows, batch.seq_lens
        if self.use_cpu_kernel:
            batch.attn_metadata = TorchMetadata(None, KernelDecode(rows, seq_lens))
            return
        key_pos = torch.arange(kv_len, device=rows.device)
        mask = key_pos[None, :] < seq_lens[:, None]
        if self.sliding_window:
            mask &= key_pos[None, :] >= seq_lens[:, None] - self.sliding_window
        part = PaddedPart(self._gather_idx(rows, kv_len), mask[:, None, None, :], None, 1)
        batch.attn_metadata = TorchMetadata(None, part)


def kv_len_buckets(context_length: int, smallest: int = 64) -> list[int]:
    """Key lengths of the static decode: 64, 96, 128, 192, 256, 384, … (2^k and 1.5 * 2^k), then
    the context length itself; at most 50% padding, two compiled shapes per doubling."""
    buckets, size = [], smallest
    while size < context_length:
        buckets += [b for b in (size, size * 3 // 2) if b < context_length]
        size *= 2
    return [*buckets, context_length]


def kv_len_bucket(seq_len: int, context_length: int) -> int:
    return next(b for b in kv_len_buckets(context_length) if b >= seq_len)
