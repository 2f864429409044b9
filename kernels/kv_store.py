"""KV store: scatter the K/V of new tokens into their slots of the paged pool."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache_dtype import FLOAT8_DTYPES, to_kv_dtype


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_buffer_ptr,  # [num_slots, num_kv_heads, head_dim]
    v_buffer_ptr,  # [num_slots, num_kv_heads, head_dim]
    loc_ptr,  # [num_tokens]
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kbs,
    stride_kbh,
    stride_vbs,
    stride_vbh,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + token).to(tl.int64)  # int64: slot * stride overflows int32
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)  # [BLOCK_H, BLOCK_D]
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    k = k.to(k_buffer_ptr.dtype.element_ty)  # rounded where the pool is narrower
    tl.store(k_buffer_ptr + slot * stride_kbs + heads * stride_kbh + dims, k, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    v = v.to(v_buffer_ptr.dtype.element_ty)
    tl.store(v_buffer_ptr + slot * stride_vbs + heads * stride_vbh + dims, v, mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """In place: k_buffer[out_cache_loc[i]] = k[i] and v_buffer[out_cache_loc[i]] = v[i].

    k, v: [num_tokens, num_kv_heads, head_dim]; k_buffer, v_buffer: [num_slots, num_kv_heads,
    head_dim]; out_cache_loc: [num_tokens] int32/int64, distinct slots. The buffers may be of
    another float dtype than k and v (--kv-cache-dtype): each value is converted as it is stored.
    Float8 buffers get values rounded in torch (`to_kv_dtype`: to nearest even, saturating), which
    the kernel scatters as bytes.
    """
    _check_inputs(k, v, k_buffer, v_buffer, out_cache_loc)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_buffer.dtype in FLOAT8_DTYPES:
        k = to_kv_dtype(k, k_buffer.dtype).view(torch.uint8)
        v = to_kv_dtype(v, v_buffer.dtype).view(torch.uint8)
        k_buffer, v_buffer = k_buffer.view(torch.uint8), v_buffer.view(torch.uint8)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_buffer,
        v_buffer,
        out_cache_loc,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        num_kv_heads,
        head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def _check_inputs(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    tensors = (k, v, k_buffer, v_buffer, out_cache_loc)
    devices = [str(t.device) for t in tensors]
    _require(len(set(devices)) == 1, f"tensors on different devices: {devices}")
    shapes = [tuple(t.shape) for t in tensors]
    _require(
        k.dim() == 3 and k.shape == v.shape and k_buffer.dim() == 3,
        f"expected k, v [num_tokens, num_kv_heads, head_dim]; got k, v, buffers, loc {shapes}",
    )
    _require(
        k_buffer.shape == v_buffer.shape and k_buffer.shape[1:] == k.shape[1:],
        f"expected k_buffer, v_buffer [num_slots, {k.shape[1]}, {k.shape[2]}]; got {shapes}",
    )
    _require(
        out_cache_loc.shape == k.shape[:1] and out_cache_loc.dtype in (torch.int32, torch.int64),
        f"out_cache_loc must be int32/int64 [num_tokens={k.shape[0]}]; got "
        f"{out_cache_loc.shape} {out_cache_loc.dtype}",
    )
    _require(
        k.dtype == v.dtype and k_buffer.dtype == v_buffer.dtype,
        f"k and v, k_buffer and v_buffer must share a dtype; got {k.dtype}, {v.dtype}, "
        f"{k_buffer.dtype}, {v_buffer.dtype}",
    )
    _require(
        all(t.stride(2) == 1 for t in tensors[:4]),
        "k, v, k_buffer and v_buffer must be contiguous along head_dim",
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """Reference of `store_kv`, in place."""
    k_buffer[out_cache_loc.long()] = to_kv_dtype(k, k_buffer.dtype)
    v_buffer[out_cache_loc.long()] = to_kv_dtype(v, v_buffer.dtype)
