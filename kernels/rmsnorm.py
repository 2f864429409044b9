"""RMSNorm, optionally fused with the residual add that precedes it (HF LlamaRMSNorm semantics)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden], read and written when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden]
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden: one program holds a whole row
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + token * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + token * stride_r + cols
        # The sum is rounded to the model dtype before the norm reads it, as in HF's decoder layer.
        x = (x + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(r_ptrs, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (x * rstd).to(dtype).to(tl.float32) * w  # HF: weight * normed.to(dtype)
    tl.store(out_ptr + token * stride_o + cols, y.to(dtype), mask=mask)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns weight * x / rms(x), computed in float32, in x's dtype.

    x: [num_tokens, hidden]; weight: [hidden]. With residual ([num_tokens, hidden]) the input is
    s = x + residual: s is written into residual in place (the new residual stream) and the
    result is rmsnorm(s).
    """
    _check_inputs(x, weight, residual)
    num_tokens, hidden = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _rmsnorm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,  # never read without a residual
        weight,
        out,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 8),
    )
    return out


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    tensors = [x, weight] if residual is None else [x, weight, residual]
    devices = [str(t.device) for t in tensors]
    _require(len(set(devices)) == 1, f"tensors on different devices: {devices}")
    _require(x.dim() == 2, f"x must be [num_tokens, hidden]; got {tuple(x.shape)}")
    _require(
        weight.shape == x.shape[1:], f"weight must be [{x.shape[1]}]; got {tuple(weight.shape)}"
    )
    _require(
        residual is None or residual.shape == x.shape,
        f"residual must have x's shape {tuple(x.shape)}",
    )
    _require(
        x.dtype in (torch.float16, torch.bfloat16, torch.float32),
        f"x must be float16/bfloat16/float32; got {x.dtype}",
    )
    dtypes = [t.dtype for t in tensors]
    _require(len(set(dtypes)) == 1, f"x, weight and residual must share a dtype; got {dtypes}")
    _require(all(t.stride(-1) == 1 for t in tensors), "x, weight, residual must be contiguous rows")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `rmsnorm`, the HF LlamaRMSNorm formula; updates residual in place too."""
    if residual is not None:
        x = x + residual
        residual.copy_(x)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
