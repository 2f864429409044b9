"""SiLU-and-mul: the activation of a fused gate/up MLP projection, silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * intermediate]: gate, then up
    out_ptr,  # [num_tokens, intermediate]
    stride_x,
    stride_o,
    intermediate,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_ptrs = x_ptr + token * stride_x + cols
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + intermediate, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + token * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] -> silu(x[:, :intermediate]) * x[:, intermediate:].

    Computed in float32, returned in x's dtype as [num_tokens, intermediate].
    """
    _check_inputs(x)
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, intermediate, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(triton.next_power_of_2(intermediate), 1024)
    grid = (num_tokens, triton.cdiv(intermediate, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), intermediate, BLOCK=block)
    return out


def _check_inputs(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [num_tokens, 2 * intermediate]; got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16/bfloat16/float32; got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous along its last dim; got strides {x.stride()}")


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Reference of `silu_and_mul`, in float32."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
