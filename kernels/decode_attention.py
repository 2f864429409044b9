"""Decode attention over the paged KV pool: one query token per request, GQA, flash-decoding.

Request b's keys are positions 0..seq_lens[b]-1 of row req_rows[b] of the request→slot table. The
sequence is cut into `num_kv_splits` chunks; stage 1 runs one program per (request, kv head,
chunk) and writes the chunk's softmax-normalised partial output and its log-sum-exp; stage 2
merges the chunks of each (request, head). Short batches of long sequences thus still fill the GPU.

`decode_attention_lse` is the same over keys key_starts[b]..seq_lens[b]-1, returning the float32
output with its log-sum-exp: a row's own keys after a shared prefix, which
`kernels.merge_attention_states` combines with the prefix's part (the cascade of
`kernels.shared_prefix_attention`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from kernels.kv_cache_dtype import FLOAT8_DTYPES


@triton.jit
def _decode_stage1_kernel(
    q_ptr,  # [batch, num_heads, head_dim]
    k_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_ptr,  # [num_slots, num_kv_heads, head_dim]
    req_to_token_ptr,  # [max_rows, context_len]
    req_rows_ptr,  # [batch]
    key_starts_ptr,  # [batch], read where HAS_KEY_STARTS (else keys start at position 0)
    seq_lens_ptr,  # [batch]
    mid_o_ptr,  # [batch, num_heads, num_kv_splits, head_dim] float32
    mid_lse_ptr,  # [batch, num_heads, num_kv_splits] float32
    sm_scale,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_table,
    num_kv_splits,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # >= GROUP and >= 16, the smallest M of tl.dot
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # see _dot_dtype
    P_DTYPE: tl.constexpr,  # see _p_dtype
    HAS_KEY_STARTS: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    first = seq_len * 0
    if HAS_KEY_STARTS:
        first = tl.load(key_starts_ptr + b).to(tl.int64)
    split_len = tl.cdiv(seq_len - first, num_kv_splits)
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start >= end:  # more splits than keys: stage 2 skips this one
        return

    heads = kv_head * GROUP + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_mask = tl.arange(0, BLOCK_H) < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_mask[:, None],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_H, HEAD_DIM]
    row = tl.load(req_rows_ptr + b).to(tl.int64)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    for block_start in range(start, end, BLOCK_N):
        pos = block_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        pos_mask = pos < end
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
        qk = tl.where(pos_mask[None, :], qk, float("-inf"))  # [BLOCK_H, BLOCK_N]
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

    mid = (b * GROUP * tl.num_programs(1) + heads) * num_kv_splits + split  # [BLOCK_H]
    tl.store(
        mid_o_ptr + mid[:, None] * HEAD_DIM + offs_d[None, :],
        acc / l_i[:, None],
        mask=head_mask[:, None],
    )
    tl.store(mid_lse_ptr + mid, m_i + tl.log(l_i), mask=head_mask)


@triton.jit
def _decode_stage2_kernel(
    mid_o_ptr,  # [batch, num_heads, num_kv_splits, head_dim] float32
    mid_lse_ptr,  # [batch, num_heads, num_kv_splits] float32
    key_starts_ptr,  # [batch], read where HAS_KEY_STARTS
    seq_lens_ptr,  # [batch]
    o_ptr,  # [batch, num_heads, head_dim]
    lse_ptr,  # [batch, num_heads] float32, written where WRITE_LSE
    stride_ob,
    stride_oh,
    num_kv_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,  # a power of two >= num_kv_splits
    HAS_KEY_STARTS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int64)
    first = seq_len * 0
    if HAS_KEY_STARTS:
        first = tl.load(key_starts_ptr + b).to(tl.int64)
    split_len = tl.cdiv(seq_len - first, num_kv_splits)
    splits = tl.arange(0, BLOCK_SPLITS)
    # the splits stage 1 wrote
    used = (splits < num_kv_splits) & (first + splits * split_len < seq_len)
    mid = (b * tl.num_programs(1) + head) * num_kv_splits + splits  # [BLOCK_SPLITS]
    lse = tl.load(mid_lse_ptr + mid, mask=used, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.exp(lse - lse_max)  # 0 for unused splits
    offs_d = tl.arange(0, HEAD_DIM)
    part = tl.load(
        mid_o_ptr + mid[:, None] * HEAD_DIM + offs_d[None, :], mask=used[:, None], other=0.0
    )  # [BLOCK_SPLITS, HEAD_DIM]
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part, 0) / total
    tl.store(o_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_ptr + b * tl.num_programs(1) + head, lse_max + tl.log(total))


_FLOAT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_INDEX_DTYPES = (torch.int32, torch.int64)


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int = 8,
) -> torch.Tensor:
    """Attention of one new token per request over its keys 0..seq_lens[b]-1 in the pool.

    q: [batch, num_heads, head_dim]; k_buffer, v_buffer: [num_slots, num_kv_heads, head_dim];
    req_to_token: [max_rows, context_len]; req_rows, seq_lens: [batch], every seq_len >= 1.
    Returns o: [batch, num_heads, head_dim] in q's dtype. Raises ValueError on mismatched
    shapes, dtypes, strides or devices.
    """
    _check_inputs(q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, num_kv_splits)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    _launch(q, k_buffer, v_buffer, req_to_token, req_rows, None, seq_lens, sm_scale, o, None,
            num_kv_splits)  # fmt: skip
    return o


def decode_attention_lse(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    key_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention` over keys key_starts[b]..seq_lens[b]-1 (key_starts[b] < seq_lens[b];
    key_starts: [batch] int32/int64), for the cascade over a shared prefix.

    Returns (o [batch, num_heads, head_dim], lse [batch, num_heads]), both float32: the
    softmax-normalised output and the log-sum-exp of the scaled scores (natural log), which
    `merge_attention_states_` takes. Raises ValueError as `decode_attention` does.
    """
    _check_inputs(q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens, num_kv_splits)
    check_key_starts(key_starts, q.shape[0], q.device)
    batch, num_heads, head_dim = q.shape
    o = torch.empty(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    _launch(q, k_buffer, v_buffer, req_to_token, req_rows, key_starts, seq_lens, sm_scale, o, lse,
            num_kv_splits)  # fmt: skip
    return o, lse


def _launch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    key_starts: torch.Tensor | None,
    seq_lens: torch.Tensor,
    sm_scale: float,
    o: torch.Tensor,
    lse: torch.Tensor | None,
    num_kv_splits: int,
) -> None:
    """Both stages into o (and lse where given); key_starts None: keys from position 0."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return
    num_kv_heads = k_buffer.shape[1]
    group = num_heads // num_kv_heads
    mid_o = torch.empty(
        batch, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=q.device
    )
    mid_lse = torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    starts = key_starts if key_starts is not None else seq_lens  # not read without key starts
    _decode_stage1_kernel[(batch, num_kv_heads, num_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_rows,
        starts,
        seq_lens,
        mid_o,
        mid_lse,
        sm_scale,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        num_kv_splits,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_N=64 if head_dim <= 128 else 32,
        DOT_DTYPE=_dot_dtype(_decode_stage1_kernel, q.dtype),
        P_DTYPE=_p_dtype(q.dtype, v_buffer.dtype),
        HAS_KEY_STARTS=key_starts is not None,
        num_warps=4,
    )
    _decode_stage2_kernel[(batch, num_heads)](
        mid_o,
        mid_lse,
        starts,
        seq_lens,
        o,
        lse if lse is not None else mid_lse,  # not written without WRITE_LSE
        o.stride(0),
        o.stride(1),
        num_kv_splits,
        HEAD_DIM=head_dim,
        BLOCK_SPLITS=max(2, triton.next_power_of_2(num_kv_splits)),
        HAS_KEY_STARTS=key_starts is not None,
        WRITE_LSE=lse is not None,
        num_warps=4,
    )


def _dot_dtype(kernel: object, dtype: torch.dtype) -> tl.dtype:
    """Operand dtype of the kernel's tl.dot: the storage dtype on a GPU, float32 when interpreted.

    Triton's interpreter keeps bf16 values as raw uint16 bits and tl.dot multiplies those bits,
    so interpreted operands are widened to float32 (exact for bf16 and fp16 values).
    """
    return tl.float32 if isinstance(kernel, InterpretedFunction) else _FLOAT_DTYPES[dtype]


def _p_dtype(q: torch.dtype, v: torch.dtype) -> tl.dtype:
    """The dtype the probabilities are rounded to before p . v: the values' for 16- and 32-bit
    pools (as a GPU's tensor cores take them), the queries' for float8 ones (whose values are
    widened to it; probabilities in float8 would keep two bits of mantissa)."""
    return _FLOAT_DTYPES[q if v in FLOAT8_DTYPES else v]


def _check_inputs(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    num_kv_splits: int,
) -> None:
    tensors = (q, k_buffer, v_buffer, req_to_token, req_rows, seq_lens)
    devices = [str(t.device) for t in tensors]
    _require(len(set(devices)) == 1, f"tensors on different devices: {devices}")
    _check_pool(q, k_buffer, v_buffer)
    _require(
        req_to_token.dim() == 2 and req_to_token.dtype in _INDEX_DTYPES,
        f"req_to_token must be 2-D int32/int64; got {req_to_token.shape} {req_to_token.dtype}",
    )
    _require(req_to_token.stride(1) == 1, "req_to_token must be contiguous along positions")
    for name, t in (("req_rows", req_rows), ("seq_lens", seq_lens)):
        _require(
            t.shape == q.shape[:1] and t.dtype in _INDEX_DTYPES,
            f"{name} must be int32/int64 [batch={q.shape[0]}]; got {tuple(t.shape)} {t.dtype}",
        )
    _require(num_kv_splits >= 1, f"num_kv_splits must be >= 1; got {num_kv_splits}")


def check_key_starts(key_starts: torch.Tensor, n: int, device: torch.device) -> None:
    """Raises ValueError unless key_starts is int32/int64 [n] on `device`."""
    _require(
        key_starts.shape == (n,) and key_starts.dtype in _INDEX_DTYPES
        and key_starts.device == device,
        f"key_starts must be int32/int64 [{n}] on {device}; got {tuple(key_starts.shape)} "
        f"{key_starts.dtype} on {key_starts.device}",
    )  # fmt: skip


def _check_pool(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    shapes = (
        f"q {tuple(q.shape)}, k_buffer {tuple(k_buffer.shape)}, v_buffer {tuple(v_buffer.shape)}"
    )
    _require(
        q.dim() == 3 and k_buffer.dim() == 3 and k_buffer.shape == v_buffer.shape,
        "expected q [batch, num_heads, head_dim], k/v_buffer [num_slots, num_kv_heads, head_dim]"
        f" of one shape; got {shapes}",
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


def kv_dtypes_supported(q: torch.dtype, k: torch.dtype, v: torch.dtype) -> bool:
    """Whether the kernels take queries of dtype `q` over K/V buffers of `k` and `v`: one float
    dtype throughout, float32 queries over bfloat16 buffers (--kv-cache-dtype bfloat16), or any
    over float8 e5m2 ones (--kv-cache-dtype fp8_e5m2). The kernels widen each key to the
    queries' dtype and round p to `_p_dtype` before p . v."""
    if q not in _FLOAT_DTYPES or k != v:
        return False
    return k == q or k in FLOAT8_DTYPES or (q == torch.float32 and k == torch.bfloat16)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Reference of `decode_attention`: softmax attention in float32, one request at a time."""
    group = q.shape[1] // k_buffer.shape[1]
    out = torch.empty_like(q)
    for b, (row, seq_len) in enumerate(zip(req_rows.tolist(), seq_lens.tolist(), strict=True)):
        slots = req_to_token[row, :seq_len].long()
        k = (
            k_buffer[slots].float().repeat_interleave(group, dim=1)
        )  # [seq_len, num_heads, head_dim]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[b].float(), k) * sm_scale  # [num_heads, seq_len]
        out[b] = torch.einsum("hs,shd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
