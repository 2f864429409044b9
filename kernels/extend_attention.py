"""Extend (prefill) attention: new tokens of many requests attend causally to their whole context.

Request i has prefix_lens[i] cached tokens and extend_lens[i] new ones, whose queries are the rows
qo_start[i] : qo_start[i] + extend_lens[i] of q. The K/V of every position, cached and new, are
already in the pool behind req_to_token[req_rows[i]], so one loop over the pool serves both: the
new token at position p sees positions 0..p. One launch covers all requests.

`extend_attention_lse` is the same over positions key_starts[i]..p, returning the float32 output
with its log-sum-exp: a request's own keys after a shared prefix, which
`kernels.merge_attention_states` combines with the prefix's part.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.decode_attention import (
    _dot_dtype,
    _p_dtype,
    check_key_starts,
    kv_dtypes_supported,
)


@triton.jit
def _extend_kernel(
    q_ptr,  # [total_new_tokens, num_heads, head_dim]
    k_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_ptr,  # [num_slots, num_kv_heads, head_dim]
    o_ptr,  # [total_new_tokens, num_heads, head_dim]
    lse_ptr,  # [total_new_tokens, num_heads] float32, written where WRITE_LSE
    req_to_token_ptr,  # [max_rows, context_len]
    req_rows_ptr,  # [num_reqs]
    key_starts_ptr,  # [num_reqs], read where HAS_KEY_STARTS (else keys start at position 0)
    prefix_lens_ptr,  # [num_reqs]
    extend_lens_ptr,  # [num_reqs]
    qo_start_ptr,  # [num_reqs]
    sm_scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_table,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    DOT_DTYPE: tl.constexpr,  # see decode_attention._dot_dtype
    P_DTYPE: tl.constexpr,  # see decode_attention._p_dtype
    HAS_KEY_STARTS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    req = tl.program_id(0)
    block_m = tl.program_id(1)
    head = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req)
    if block_m * BLOCK_M >= extend_len:  # the grid is sized for the longest request
        return
    prefix_len = tl.load(prefix_lens_ptr + req)
    qo_start = tl.load(qo_start_ptr + req).to(tl.int64)
    row = tl.load(req_rows_ptr + req).to(tl.int64)
    kv_head = head // GROUP

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the request's new tokens
    m_mask = offs_m < extend_len
    q_pos = prefix_len + offs_m  # [BLOCK_M] positions in the sequence
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (qo_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, HEAD_DIM]

    # Every row, those past extend_len too, sees its first key (key_start <= prefix_len <= q_pos),
    # so no row of the softmax is empty (no NaN).
    kv_end = prefix_len + tl.minimum((block_m + 1) * BLOCK_M, extend_len)  # exclusive
    key_start = prefix_len * 0
    if HAS_KEY_STARTS:
        key_start = tl.load(key_starts_ptr + req).to(prefix_len.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for block_start in range(key_start, kv_end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        pos_mask = pos < kv_end
        # int64: slot * stride overflows int32 in pools of a few million tokens
        slot = tl.load(req_to_token_ptr + row * stride_table + pos, mask=pos_mask, other=0)
        slot = slot.to(tl.int64)
        k = tl.load(
            k_ptr + slot[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
            mask=pos_mask[None, :],
            other=0.0,
        )  # [HEAD_DIM, BLOCK_N]
        # "ieee": a float32 pool gets exact products rather than TF32; bf16/fp16 are unaffected
        qk = tl.dot(q, k.to(DOT_DTYPE), input_precision="ieee") * sm_scale
        causal = (pos[None, :] <= q_pos[:, None]) & pos_mask[None, :]
        qk = tl.where(causal, qk, float("-inf"))  # [BLOCK_M, BLOCK_N]
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
        pv = tl.dot(p.to(P_DTYPE).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / l_i[:, None]
    o_offs = (qo_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
    if WRITE_LSE:
        lse_offs = (qo_start + offs_m) * tl.num_programs(2) + head
        tl.store(lse_ptr + lse_offs, m_i + tl.log(l_i), mask=m_mask)


_INDEX_DTYPES = (torch.int32, torch.int64)


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_start: torch.Tensor,
    sm_scale: float,
    max_extend_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its cached prefix and themselves.

    q: [total_new_tokens, num_heads, head_dim]; k_buffer, v_buffer: [num_slots, num_kv_heads,
    head_dim]; req_to_token: [max_rows, context_len]; req_rows, prefix_lens, extend_lens,
    qo_start: [num_reqs]. `max_extend_len` (>= every extend_len) sizes the grid; without it the
    launcher reads extend_lens.max(), a device sync. Returns o: [total_new_tokens, num_heads,
    head_dim] in q's dtype. Raises ValueError on mismatched shapes, dtypes, strides or devices.
    """
    _check_inputs(q, k_buffer, v_buffer, req_to_token, req_rows, prefix_lens, extend_lens, qo_start)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    _launch(q, k_buffer, v_buffer, req_to_token, req_rows, None, prefix_lens, extend_lens,
            qo_start, sm_scale, max_extend_len, o, None)  # fmt: skip
    return o


def extend_attention_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    key_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_start: torch.Tensor,
    sm_scale: float,
    max_extend_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`extend_attention` with each new token seeing positions key_starts[i]..its own
    (key_starts[i] <= prefix_lens[i]; key_starts: [num_reqs] int32/int64), for the cascade over
    a shared prefix.

    Returns (o [total_new_tokens, num_heads, head_dim], lse [total_new_tokens, num_heads]), both
    float32: the softmax-normalised output and the log-sum-exp of the scaled scores (natural
    log), which `merge_attention_states_` takes. Raises ValueError as `extend_attention` does.
    """
    _check_inputs(q, k_buffer, v_buffer, req_to_token, req_rows, prefix_lens, extend_lens, qo_start)
    check_key_starts(key_starts, req_rows.shape[0], q.device)
    o = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _launch(q, k_buffer, v_buffer, req_to_token, req_rows, key_starts, prefix_lens, extend_lens,
            qo_start, sm_scale, max_extend_len, o, lse)  # fmt: skip
    return o, lse


def _launch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    key_starts: torch.Tensor | None,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_start: torch.Tensor,
    sm_scale: float,
    max_extend_len: int | None,
    o: torch.Tensor,
    lse: torch.Tensor | None,
) -> None:
    """The kernel into o (and lse where given); key_starts None: keys from position 0."""
    num_heads, head_dim = q.shape[1:]
    if max_extend_len is None:
        max_extend_len = int(extend_lens.max()) if len(extend_lens) else 0
    # 64 query rows while a row of q takes at most 256 bytes (bfloat16 up to head_dim 128):
    # float32 at 128, or 256 in any dtype, would take more shared memory than sm_86/89 GPUs
    # have (kernels.compile_check).
    block_m = 64 if head_dim * q.element_size() <= 256 else 32
    grid = (len(req_rows), triton.cdiv(max_extend_len, block_m), num_heads)
    if 0 in grid:
        return
    _extend_kernel[grid](
        q,
        k_buffer,
        v_buffer,
        o,
        lse if lse is not None else o,  # not written without WRITE_LSE
        req_to_token,
        req_rows,
        key_starts if key_starts is not None else prefix_lens,  # not read without key starts
        prefix_lens,
        extend_lens,
        qo_start,
        sm_scale,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        o.stride(0),
        o.stride(1),
        req_to_token.stride(0),
        GROUP=num_heads // k_buffer.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_m,
        DOT_DTYPE=_dot_dtype(_extend_kernel, q.dtype),
        P_DTYPE=_p_dtype(q.dtype, v_buffer.dtype),
        HAS_KEY_STARTS=key_starts is not None,
        WRITE_LSE=lse is not None,
        num_warps=4 if head_dim <= 64 else 8,
    )


def _check_inputs(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_start: torch.Tensor,
) -> None:
    per_req = dict(
        req_rows=req_rows, prefix_lens=prefix_lens, extend_lens=extend_lens, qo_start=qo_start
    )
    tensors = [q, k_buffer, v_buffer, req_to_token, *per_req.values()]
    devices = [str(t.device) for t in tensors]
    _require(len(set(devices)) == 1, f"tensors on different devices: {devices}")
    _check_pool(q, k_buffer, v_buffer)
    _require(
        req_to_token.dim() == 2 and req_to_token.dtype in _INDEX_DTYPES,
        f"req_to_token must be 2-D int32/int64; got {req_to_token.shape} {req_to_token.dtype}",
    )
    _require(req_to_token.stride(1) == 1, "req_to_token must be contiguous along positions")
    for name, t in per_req.items():
        _require(
            t.shape == req_rows.shape[:1] and t.dim() == 1 and t.dtype in _INDEX_DTYPES,
            f"{name} must be int32/int64 [num_reqs={req_rows.shape[0]}]; got {t.shape} {t.dtype}",
        )


def _check_pool(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    shapes = f"q {tuple(q.shape)}, k/v_buffer {tuple(k_buffer.shape)}/{tuple(v_buffer.shape)}"
    _require(
        q.dim() == 3 and k_buffer.dim() == 3 and k_buffer.shape == v_buffer.shape,
        "expected q [total_new_tokens, num_heads, head_dim], k/v_buffer [num_slots, num_kv_heads,"
        f" head_dim] of one shape; got {shapes}",
    )
    head_dim = q.shape[2]
    _require(
        k_buffer.shape[2] == head_dim and head_dim >= 16 and head_dim & (head_dim - 1) == 0,
        f"head_dim must be one power of two >= 16; got {shapes}",
    )
    _require(q.shape[1] % k_buffer.shape[1] == 0, f"num_heads % num_kv_heads != 0: {shapes}")
    _require(
        kv_dtypes_supported(q.dtype, k_buffer.dtype, v_buffer.dtype),
        f"k_buffer and v_buffer must have q's float16/bfloat16/float32 dtype, bfloat16 under "
        f"float32 q, or float8_e5m2; got {q.dtype}, {k_buffer.dtype}, {v_buffer.dtype}",
    )
    _require(
        q.stride(2) == 1 and k_buffer.stride(2) == 1 and v_buffer.stride(2) == 1,
        "q, k_buffer and v_buffer must be contiguous along head_dim",
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_start: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Reference of `extend_attention`: causal softmax attention in float32, request by request."""
    group = q.shape[1] // k_buffer.shape[1]
    out = torch.empty_like(q)
    per_req = (t.tolist() for t in (req_rows, prefix_lens, extend_lens, qo_start))
    for row, prefix_len, extend_len, start in zip(*per_req, strict=True):
        seq_len = prefix_len + extend_len
        slots = req_to_token[row, :seq_len].long()
        k = (
            k_buffer[slots].float().repeat_interleave(group, dim=1)
        )  # [seq_len, num_heads, head_dim]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        qi = q[start : start + extend_len].float()  # [extend_len, num_heads, head_dim]
        scores = torch.einsum("thd,shd->hts", qi, k) * sm_scale  # [num_heads, extend_len, seq_len]
        q_pos = torch.arange(prefix_len, seq_len, device=q.device)
        future = torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start : start + extend_len] = torch.einsum("hts,shd->thd", probs, v).to(q.dtype)
    return out
