"""Shared-prefix attention: groups of query tokens over one shared KV span per group.

Rows that share a cached prefix read it once: group g's tokens tok_offsets[g] .. tok_offsets[g+1]-1
(all heads) attend positions 0 .. prefix_lens[g]-1 of table row group_rows[g]. One program per
(group, kv head, block of tokens) computes the block's G query heads of every token against each
key block with one tl.dot, so a span is read once per block of tokens rather than once per row.
Returns the partial output (softmax over the span only) and its log-sum-exp, for
`merge_attention_states` to combine with each row's own keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.decode_attention import _dot_dtype, _p_dtype, kv_dtypes_supported


@triton.jit
def _shared_prefix_kernel(
    q_ptr,  # [N, num_heads, head_dim]
    k_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_ptr,  # [num_slots, num_kv_heads, head_dim]
    req_to_token_ptr,  # [max_rows, context_len]
    group_rows_ptr,  # [G]
    tok_offsets_ptr,  # [G + 1]
    prefix_lens_ptr,  # [G]
    o_ptr,  # [N, num_heads, head_dim] float32
    lse_ptr,  # [N, num_heads] float32
    sm_scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_table,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,  # query rows (token, head) per program, a power of two >= 16
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # see decode_attention._dot_dtype
    P_DTYPE: tl.constexpr,  # see decode_attention._p_dtype
):
    g = tl.program_id(0)
    kv_head = tl.program_id(1)
    block = tl.program_id(2)
    first = tl.load(tok_offsets_ptr + g)
    n_tok = tl.load(tok_offsets_ptr + g + 1) - first
    tokens_per_block: tl.constexpr = BLOCK_R // GROUP
    if block * tokens_per_block >= n_tok:
        return
    # Row r is token block * tokens_per_block + r // GROUP of the group, head kv_head * G + r % G.
    r = tl.arange(0, BLOCK_R)
    tok = first + block * tokens_per_block + r // GROUP  # [BLOCK_R]
    head = kv_head * GROUP + r % GROUP
    row_mask = (r < tokens_per_block * GROUP) & (tok < first + n_tok)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_R, HEAD_DIM]
    row = tl.load(group_rows_ptr + g).to(tl.int64)
    span = tl.load(prefix_lens_ptr + g)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    for block_start in range(0, span, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < span
        slot = tl.load(req_to_token_ptr + row * stride_table + pos, mask=pos_mask, other=0)
        slot = slot.to(tl.int64)
        k = tl.load(
            k_ptr + slot[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
            mask=pos_mask[None, :],
            other=0.0,
        )  # [HEAD_DIM, BLOCK_N]
        qk = tl.dot(q, k.to(DOT_DTYPE), input_precision="ieee") * sm_scale
        qk = tl.where(pos_mask[None, :], qk, float("-inf"))  # [BLOCK_R, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
            mask=pos_mask[:, None],
            other=0.0,
        )  # [BLOCK_N, HEAD_DIM]
        # p is rounded to P_DTYPE as on a GPU, then widened to DOT_DTYPE (a no-op there)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(P_DTYPE).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee"
        )
        m_i = m_new
    num_heads = tl.num_programs(1) * GROUP  # o and lse are contiguous
    tl.store(
        o_ptr + (tok[:, None] * num_heads + head[:, None]) * HEAD_DIM + offs_d[None, :],
        acc / l_i[:, None],
        mask=row_mask[:, None],
    )
    tl.store(lse_ptr + tok * num_heads + head, m_i + tl.log(l_i), mask=row_mask)


def shared_prefix_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    group_rows: torch.Tensor,
    tok_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
    max_tokens_per_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, H, D] (tokens of G groups back to back); k/v_buffer: [slots, Hkv, D], q's dtype,
    bfloat16 under float32 q or float8_e5m2 (as `decode_attention` takes them); req_to_token:
    [rows, context] int32/int64; group_rows, prefix_lens: [G]; tok_offsets: [G + 1] (int32/int64,
    on q's device). Every span is at least one key. `max_tokens_per_group` (>= the tokens of any
    group) sizes the grid without a device sync when given. → out [N, H, D] and lse [N, H],
    float32. Raises ValueError on mismatched shapes, dtypes or devices."""
    _check(q, k_buffer, v_buffer, req_to_token, group_rows, tok_offsets, prefix_lens)
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    o = torch.empty(n, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, num_heads, dtype=torch.float32, device=q.device)
    num_groups = group_rows.shape[0]
    if n == 0 or num_groups == 0:
        return o, lse
    if max_tokens_per_group is None:
        max_tokens_per_group = int(tok_offsets.diff().max())
    block_r = max(16, triton.next_power_of_2(group))
    tokens_per_block = block_r // group
    grid = (num_groups, num_kv_heads, triton.cdiv(max_tokens_per_group, tokens_per_block))
    _shared_prefix_kernel[grid](
        q, k_buffer, v_buffer, req_to_token, group_rows, tok_offsets, prefix_lens, o, lse,
        sm_scale, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_N=64 if head_dim <= 128 else 32,
        DOT_DTYPE=_dot_dtype(_shared_prefix_kernel, q.dtype),
        P_DTYPE=_p_dtype(q.dtype, v_buffer.dtype), num_warps=4,
    )  # fmt: skip
    return o, lse


def _check(q, k_buffer, v_buffer, req_to_token, group_rows, tok_offsets, prefix_lens) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    require(q.dim() == 3 and k_buffer.dim() == 3, "q and the KV buffers must be 3-D")
    require(k_buffer.shape == v_buffer.shape, "k_buffer and v_buffer shapes differ")
    require(q.shape[2] == k_buffer.shape[2], "head_dim of q and the KV buffers differ")
    require(q.shape[1] % k_buffer.shape[1] == 0, "query heads must be a multiple of KV heads")
    require(q.shape[2] & (q.shape[2] - 1) == 0, "head_dim must be a power of two")
    require(
        kv_dtypes_supported(q.dtype, k_buffer.dtype, v_buffer.dtype),
        "the KV buffers' dtypes must be q's, bfloat16 under float32 q, or float8_e5m2 (as for "
        f"decode_attention); got {q.dtype}, {k_buffer.dtype}, {v_buffer.dtype}",
    )
    require(q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1,
            "the head_dim axis must be contiguous")  # fmt: skip
    require(req_to_token.stride(1) == 1, "req_to_token rows must be contiguous")
    index = (req_to_token, group_rows, tok_offsets, prefix_lens)
    require(all(t.dtype in (torch.int32, torch.int64) for t in index), "indices: int32/int64")
    require(all(t.device == q.device for t in (k_buffer, v_buffer, *index)), "devices differ")
    require(group_rows.shape == prefix_lens.shape, "group_rows and prefix_lens: [G]")
    require(tok_offsets.shape[0] == group_rows.shape[0] + 1, "tok_offsets: [G + 1]")


def shared_prefix_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    group_rows: torch.Tensor,
    tok_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain PyTorch, one group at a time (float32)."""
    o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    group = q.shape[1] // k_buffer.shape[1]
    for g in range(group_rows.shape[0]):
        slots = req_to_token[int(group_rows[g]), : int(prefix_lens[g])].long()
        k = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        part = slice(int(tok_offsets[g]), int(tok_offsets[g + 1]))
        scores = torch.einsum("thd,lhd->thl", q[part].float(), k) * sm_scale
        lse[part] = torch.logsumexp(scores, dim=-1)
        o[part] = torch.einsum("thl,lhd->thd", (scores - lse[part][..., None]).exp(), v)
    return o, lse
