"""Fused element-wise steps of a Llama layer on the CPU (kernels/cpu/fused.cpp), with references.

Each `*_ref` is the plain PyTorch formula (Hugging Face's, rounding where its op sequence rounds)
and is also what the model runs where the C++ build is unavailable or the tensors are not on the
CPU; each kernel returns the same result as its reference (bit for bit in bfloat16 except for the
order of a float32 sum in the RMSNorm).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from kernels.cpu.build import Extension, kernels_enabled
from kernels.kv_cache_dtype import store_rows

_fused = Extension(
    "radixserve_cpu_fused", Path(__file__).with_name("fused.cpp"), "CPU fused layer kernels"
)


def available(x: torch.Tensor) -> ModuleType | None:
    """The compiled module when `x` can use it (a float32 / bfloat16 CPU tensor, kernels not
    disabled by RADIXSERVE_DISABLE_CPU_KERNELS=1, not inside torch.compile, which traces the
    references instead); None otherwise."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    return _fused.load() if kernels_enabled() else None


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [T, dim]; weight: [dim] → (weight * rmsnorm(x + residual), x + residual).
    Without a residual the second result is None. Same dtype throughout."""
    module = available(x)
    if module is None or x.dim() != 2 or weight.dtype != x.dtype:
        return add_rmsnorm_ref(x, residual, weight, eps)
    out, total = module.add_rmsnorm(
        x.contiguous(),
        None if residual is None else residual.contiguous(),
        weight.contiguous(),
        eps,
    )
    return out, (None if residual is None else total)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF LlamaRMSNorm with the residual added first (in x's dtype)."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * inter] = gate | up → silu(gate) * up, [T, inter]."""
    module = available(x)
    if module is None or x.dim() != 2:
        return silu_and_mul_ref(x)
    return module.silu_and_mul(x.contiguous())


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) of x [S, V]: [S] int64, the first index of each row's largest value
    (or of its first NaN), as torch gives it. The kernel takes float32 CPU rows where it is
    built with AVX-512 (a row of 49,152 logits: 9 against torch's 42 us on a 2-core AMD EPYC;
    16 rows 54 against 328 us) or AVX2 (24 against 133 us; 32 rows 194 against 2,018 us on a
    2-core AMD EPYC without AVX-512); anything else runs torch's."""
    module = available(x)
    if (
        module is None
        or not module.argmax_vectorized
        or x.dim() != 2
        or x.dtype != torch.float32
        or x.shape[1] == 0
    ):
        return x.argmax(-1)
    return module.argmax(x.contiguous())


def rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of a fused projection's q and k heads.

    qkv: [T, (H + 2 * Hkv) * D] (q | k | v); positions: [T] int64; cos, sin: [max_positions,
    D // 2] float32 → (q [T, H, D], k [T, Hkv, D]) in qkv's dtype, new tensors. Raises
    (RuntimeError) when a position is outside the tables."""
    module = available(qkv)
    if module is None or qkv.dim() != 2 or qkv.stride(1) != 1:
        return rope_ref(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    return tuple(  # type: ignore[return-value]
        module.rope(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    )


def rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    loc: torch.Tensor,
) -> torch.Tensor:
    """`rope`, with the rotated k heads and the v heads (qkv's last Hkv * D columns) of token t
    written into row loc[t] of k_pool and v_pool instead of returned: one call where `rope` and
    two `store_rows` were three (each about 4 us of dispatch at one row).

    qkv: [T, (H + 2 * Hkv) * D]; pools: [slots, Hkv, D], any dtype `store_rows` takes; loc: [T]
    int64 distinct slots → q [T, H, D] in qkv's dtype. The kernel runs where the pools have
    qkv's dtype and are contiguous; otherwise the unfused calls, with the same result. Raises
    (RuntimeError) when a position is outside the tables or a slot outside the pools."""
    module = available(qkv)
    if (
        module is None
        or qkv.dim() != 2
        or qkv.stride(1) != 1
        or k_pool.dtype != qkv.dtype
        or not (k_pool.is_contiguous() and v_pool.is_contiguous())
    ):
        return rope_store_ref(
            qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim, k_pool, v_pool, loc
        )
    return module.rope_store(
        qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim, k_pool, v_pool, loc
    )


def rope_store_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    loc: torch.Tensor,
) -> torch.Tensor:
    """`rope_store` unfused: `rope`, then `store_rows` of k and of v."""
    q, k = rope(qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    first = (num_heads + num_kv_heads) * head_dim
    v = qkv[:, first : first + num_kv_heads * head_dim].reshape(-1, num_kv_heads, head_dim)
    store_rows(k_pool, loc, k)
    store_rows(v_pool, loc, v)
    return q


def rope_ref(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotate-half RoPE in the activation dtype, cos/sin cast to it."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].reshape(-1, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].reshape(-1, num_kv_heads, head_dim)
    c = cos[positions].unsqueeze(1).to(qkv.dtype)
    s = sin[positions].unsqueeze(1).to(qkv.dtype)
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
