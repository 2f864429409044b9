"""Weight-only quantized linear layers on the GPU: y = x W^T (+ bias), with W stored as int8 (one
scale per output channel) or int4 (a scale and a zero per group of input features) and expanded
tile by tile in registers, never in memory: a decode step reads 1 or 0.5 bytes per weight.

- int8: W[n, k] = q[n, k] * scale[n], q int8 [N, K]. Each tile of q is converted to the
  activation dtype (exact: |q| <= 128 fits bfloat16's and float16's significands), multiplied
  by x in `tl.dot` with float32 accumulation, and the sums are scaled per channel at the end.
- int4: W[n, k] = (q[n, k] - 8) * scale[n, k // group] + zero[n, k // group], q in [0, 15]
  packed two to a byte by `kernels.cpu.linear.pack_int4` ([N, K / 2] uint8, GGUF's order: in
  each block of 32 inputs, byte i holds input i in its low half and input i + 16 in its high
  one), scale and zero [N, K / group]. Each tile of W is expanded in float32, rounded to the
  activation dtype, and multiplied in `tl.dot` with float32 accumulation.

float32 activations multiply in full float32 (no TF32). Each `*_ref` is the PyTorch formula,
rounded where the kernel rounds. The executor's `Int8Linear` and `Int4Linear` run these on CUDA
devices (services/executor/quantization.py); on the CPU they run the C++ kernels instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.cpu.linear import unpack_int4
from kernels.decode_attention import _dot_dtype

BLOCK_K = 32  # input features per step; divides every int4 group size (32 .. 256)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _quant_matmul_kernel(
    x_ptr,  # [M, K]
    q_ptr,  # int8: [N, K] int8; int4: [N, K / 2] uint8
    scale_ptr,  # int8: [N]; int4: [N, K / GROUP]
    zero_ptr,  # int4: [N, K / GROUP]; int8: unused
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    GROUP: tl.constexpr,  # int4: inputs per group; 0: int8
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(
            x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = n_ok[:, None] & k_ok[None, :]
        if GROUP == 0:
            q = tl.load(
                q_ptr + rn[:, None].to(tl.int64) * stride_qn + kk[None, :], mask=w_mask, other=0
            )
            w = q.to(tl.float32)
        else:
            byte = (kk // 32) * 16 + kk % 16  # pack_int4's order: i and i + 16 share a byte
            packed = tl.load(
                q_ptr + rn[:, None].to(tl.int64) * stride_qn + byte[None, :],
                mask=w_mask,
                other=0,
            )
            nibble = (packed.to(tl.int32) >> (((kk[None, :] % 32) // 16) * 4)) & 15
            group = k0 // GROUP  # a block of BLOCK_K inputs lies in one group
            scale = tl.load(scale_ptr + rn * stride_sn + group, mask=n_ok, other=0.0)
            zero = tl.load(zero_ptr + rn * stride_sn + group, mask=n_ok, other=0.0)
            w = (nibble.to(tl.float32) - 8.0) * scale.to(tl.float32)[:, None]
            w = w + zero.to(tl.float32)[:, None]
        w = w.to(x_ptr.dtype.element_ty)  # the activation dtype (exact for int8)
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision="ieee")
    if GROUP == 0:
        acc = acc * tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] (float16, bfloat16 or float32) @ (q [N, K] int8 * scale [N])^T + bias [N] →
    [M, N] in x's dtype: (sum_k x q) * scale (+ bias), summed in float32, rounded once. Raises
    ValueError on shapes, dtypes or devices that do not match."""
    _check_inputs(x, q, torch.int8, q.shape[1], scale, (q.shape[0],), bias)
    return _launch(x, q, scale, scale, bias, group=0)


def int4_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [M, K] @ W^T + bias [N] → [M, N] in x's dtype, with W [N, K] = (q - 8) * scale + zero
    per group of `group_size` inputs (a multiple of 32 that divides K), q packed by
    `kernels.cpu.linear.pack_int4`
    ([N, K / 2] uint8) and scale, zero [N, K / group_size]; W is rounded to x's dtype and the
    products summed in float32. Raises ValueError on shapes, dtypes or devices that do not
    match."""
    if group_size % BLOCK_K or x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} must be a multiple of {BLOCK_K} dividing K")
    k = q.shape[1] * 2
    groups = (q.shape[0], k // group_size)
    _check_inputs(x, q, torch.uint8, k, scale, groups, bias)
    if (
        zero.shape != groups
        or zero.dtype != scale.dtype
        or zero.stride() != scale.stride()
        or zero.device != scale.device
    ):
        raise ValueError(f"zero must be like scale {tuple(groups)}; got {tuple(zero.shape)}")
    return _launch(x, q, scale, zero, bias, group=group_size)


def _launch(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    m, k = x.shape
    n = q.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _quant_matmul_kernel[grid](
        x,
        q,
        scale,
        zero,
        bias if bias is not None else scale,
        out,
        m,
        n,
        k,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        out.stride(0),
        GROUP=group,
        HAS_BIAS=bias is not None,
        DOT_DTYPE=_dot_dtype(_quant_matmul_kernel, x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
    )
    return out


def _check_inputs(
    x: torch.Tensor,
    q: torch.Tensor,
    q_dtype: torch.dtype,
    k: int,
    scale: torch.Tensor,
    scale_shape: tuple[int, ...],
    bias: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or x.dtype not in ACTIVATION_DTYPES or x.stride(-1) != 1:
        raise ValueError(
            f"x must be [M, K] float16/bfloat16/float32, contiguous along K; got "
            f"{tuple(x.shape)} {x.dtype}"
        )
    if q.dim() != 2 or q.dtype != q_dtype or not q.is_contiguous() or x.shape[1] != k:
        raise ValueError(
            f"q must be a contiguous {q_dtype} tensor for {x.shape[1]} inputs; got "
            f"{tuple(q.shape)} {q.dtype}"
        )
    if tuple(scale.shape) != scale_shape or scale.dtype != x.dtype or scale.stride(-1) != 1:
        raise ValueError(f"scale must be {scale_shape} {x.dtype}; got {tuple(scale.shape)}")
    if bias is not None and (
        bias.shape != (q.shape[0],) or bias.dtype != x.dtype or bias.stride(-1) != 1
    ):
        raise ValueError(f"bias must be [{q.shape[0]}] {x.dtype}; got {tuple(bias.shape)}")
    devices = {t.device for t in (x, q, scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, q, scale and bias must be on one device; got {devices}")


def int4_weight(
    q_packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """W [N, K] float32 = (q - 8) * scale + zero per group, from the bytes of
    `kernels.cpu.linear.pack_int4`."""
    q = unpack_int4(q_packed).float()
    expand = lambda t: t.float().repeat_interleave(group_size, dim=1)  # noqa: E731
    return (q - 8) * expand(scale) + expand(zero)


def int8_linear_ref(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference of `int8_linear`: (x · q) * scale (+ bias) in float32, rounded once."""
    y = torch.nn.functional.linear(x.float(), q.float()) * scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def int4_linear_ref(
    x: torch.Tensor,
    q_packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Reference of `int4_linear`: W rounded to x's dtype, x · W (+ bias) in float32, rounded
    once."""
    w = int4_weight(q_packed, scale, zero, group_size).to(x.dtype).float()
    y = torch.nn.functional.linear(x.float(), w)
    return (y if bias is None else y + bias.float()).to(x.dtype)
