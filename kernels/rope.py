"""Rotary position embedding, rotate-half layout (HF Llama), applied in place to q and k.

The cos/sin tables are precomputed from inv_freq, which already carries any frequency scaling
(`llama3_inv_freq_ref` gives Llama 3.1's); the kernel only looks positions up in them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's [num_heads, head_dim]
    stride_h,
    num_heads,
    cos,  # [BLOCK_D] float32
    sin,  # [BLOCK_D] float32
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (dims < half)  # [BLOCK_H, BLOCK_D]
    x1_ptrs = x_ptr + heads * stride_h + dims
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(x1_ptrs, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(x1_ptrs + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    positions_ptr,  # [num_tokens]
    cos_ptr,  # [max_positions, head_dim // 2] float32
    sin_ptr,  # [max_positions, head_dim // 2] float32
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_sin,
    num_heads,
    num_kv_heads,
    half,  # head_dim // 2
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    cos = tl.load(cos_ptr + pos * stride_cos + dims, mask=dims < half, other=0.0)
    sin = tl.load(sin_ptr + pos * stride_sin + dims, mask=dims < half, other=0.0)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, num_heads, cos, sin, half, BLOCK_HQ, BLOCK_D
    )
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, half, BLOCK_HK, BLOCK_D
    )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place by their tokens' positions; returns them.

    q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]; positions:
    [num_tokens] int; cos, sin: [max_positions, head_dim // 2] float32. With x1, x2 the halves of
    head_dim: x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, computed in float32.
    """
    _check_inputs(q, k, positions, cos, sin)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return q, k
    _rope_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        num_heads,
        k.shape[1],
        head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(head_dim // 2),
    )
    return q, k


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    tensors = (q, k, positions, cos, sin)
    devices = [str(t.device) for t in tensors]
    _require(len(set(devices)) == 1, f"tensors on different devices: {devices}")
    shapes = [tuple(t.shape) for t in tensors]
    _require(
        q.dim() == 3 and k.dim() == 3 and q.shape[::2] == k.shape[::2] and q.shape[2] % 2 == 0,
        f"expected q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim] "
        f"with an even head_dim; got q, k, positions, cos, sin {shapes}",
    )
    _require(
        positions.shape == q.shape[:1] and positions.dtype in (torch.int32, torch.int64),
        f"positions must be int32/int64 [num_tokens]; got {shapes[2]} {positions.dtype}",
    )
    _require(
        cos.dim() == 2 and cos.shape == sin.shape and cos.shape[1] == q.shape[2] // 2,
        f"cos, sin must be [max_positions, head_dim // 2]; got {shapes}",
    )
    _require(cos.dtype == sin.dtype == torch.float32, f"cos, sin must be float32; got {cos.dtype}")
    _require(
        q.dtype == k.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32),
        f"q, k must share a float16/bfloat16/float32 dtype; got {q.dtype}, {k.dtype}",
    )
    _require(
        all(t.stride(-1) == 1 for t in (q, k, cos, sin)),
        "q, k, cos and sin must be contiguous along their last dim",
    )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `apply_rope`, in place on q and k too."""
    c, s = cos[positions.long()][:, None, :], sin[positions.long()][:, None, :]  # [t, 1, d/2]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1))
    return q, k


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, head_dim // 2] float32 for inv_freq [head_dim // 2]."""
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq.float())
    return angles.cos(), angles.sin()


def llama3_inv_freq_ref(
    base: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """inv_freq [head_dim // 2] with Llama 3.1's frequency scaling (HF `rope_type="llama3"`).

    Wavelengths longer than original_max / low_freq_factor are stretched by `factor`, those
    shorter than original_max / high_freq_factor are kept, and the band between is interpolated.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
