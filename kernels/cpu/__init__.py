"""C++ kernels for the CPU, compiled on first use with torch's extension builder.

`paged_decode_attention` (one query token per request) and `extend_attention` (a request's new
tokens over its cached prefix, causal) read K/V rows straight from the paged pool through the
request→KV-slot table, instead of gathering them into a padded copy first. The build is cached under
torch's extension directory, keyed by the source and by this CPU's instruction-set flags, so a
binary built for one CPU is never loaded on another. If the build fails (no compiler), callers
fall back to the PyTorch path; `load_error()` says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import torch

from kernels.cpu.build import Extension, cpu_flags, kernels_enabled

log = logging.getLogger("radixserve.kernels")
SOURCE = Path(__file__).with_name("attention.cpp")
_attention = Extension("radixserve_cpu_attention", SOURCE, "CPU attention kernel")
# Extend and shared-prefix attention on AMX tiles (attention_amx.cpp): bfloat16 queries over
# bfloat16 pools, on CPUs with AMX; its own extension, so a compiler without AMX support loses
# only these kernels.
_attention_amx = Extension(
    "radixserve_cpu_attention_amx",
    SOURCE.with_name("attention_amx.cpp"),
    "CPU AMX attention kernel",
    requires=("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"),
    cflags=("-mamx-tile", "-mamx-bf16"),
)


def load() -> ModuleType | None:
    """The compiled attention module, building it on first call; None when it cannot be built."""
    return _attention.load()


def load_error() -> str | None:
    return _attention.error


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D]; pools: [slots, Hkv, D] (q's dtype, bfloat16 under float32 q, or float8 e5m2;
    see KERNEL_DTYPES); table: [rows, ctx] int64 → out [B, H, D] in q.dtype.

    Registered as the custom op `radixserve::paged_decode_attention`, so `torch.compile` keeps it
    as one opaque call inside a compiled step; eager callers skip the op dispatch (it costs about
    as much as the kernel itself at batch 1)."""
    if torch.compiler.is_compiling():
        return _paged_decode_attention_op(q, k_pool, v_pool, table, rows, seq_lens, scale)
    check_decode_args(q, k_pool, v_pool, table, rows, seq_lens)
    return _run_decode(q, k_pool, v_pool, table, rows, seq_lens, scale)


def amx_module(q: torch.Tensor, k_pool: torch.Tensor) -> ModuleType | None:
    """The AMX attention module where it takes queries like `q` ([T, H, D]) over pools like
    `k_pool`: both bfloat16 on the CPU, D a multiple of 64, on a CPU with AMX whose tiles Linux
    lets this process use, kernels not disabled (RADIXSERVE_DISABLE_CPU_KERNELS=1); else None.
    Its `extend_attention`, `extend_attention_lse` and `shared_prefix_attention` take the
    arguments of the attention module's functions of the same names."""
    if q.dtype != torch.bfloat16 or k_pool.dtype != torch.bfloat16 or q.device.type != "cpu":
        return None
    if q.shape[-1] % 64 or not kernels_enabled():
        return None
    module = _attention_amx.load()
    return module if module is not None and module.tiles_available() else None


def extend_module(q: torch.Tensor, k_pool: torch.Tensor) -> ModuleType:
    """The module that runs extend and shared-prefix attention of `q` over `k_pool`: the AMX
    one where `amx_module` gives it, else the attention module (RuntimeError if unbuilt)."""
    return amx_module(q, k_pool) or _module_or_raise()


def _module_or_raise() -> ModuleType:
    return _attention.require()


def _run_decode(q, k_pool, v_pool, table, rows, seq_lens, scale) -> torch.Tensor:
    # The module returns q's dtype (bfloat16 rounded once in C++, float32 as it is).
    return _module_or_raise().paged_decode_attention(
        q.contiguous(), k_pool, v_pool, table, rows, seq_lens, scale
    )


@torch.library.custom_op("radixserve::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _run_decode(q, k_pool, v_pool, table, rows, seq_lens, scale)


@_paged_decode_attention_op.register_fake
def _(q, k_pool, v_pool, table, rows, seq_lens, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def check_decode_args(q, k_pool, v_pool, table, rows, seq_lens) -> None:
    """Raises ValueError where `paged_decode_attention` cannot take these arguments (device,
    dtypes, shapes, contiguity). Every layer's pools have the same shape, dtype and layout, so a
    caller that runs the kernel directly over all layers of a step checks once."""
    _check_pools(q, k_pool, v_pool, table)
    for name, t in (("rows", rows), ("seq_lens", seq_lens)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64")
    if rows.shape != seq_lens.shape or rows.shape[0] != q.shape[0]:
        raise ValueError("rows and seq_lens need one entry per query")


# (query dtype, KV pool dtype) pairs the kernels take: the model's own dtype, a float32 model over
# a bfloat16 pool (--kv-cache-dtype bfloat16), or a float32 or bfloat16 model over a float8 e5m2
# pool (--kv-cache-dtype fp8_e5m2): keys and values widened to float32 as they are read, or float8
# keys (and, in extend, values) converted to bfloat16 for bfloat16 queries (both exact).
KERNEL_DTYPES = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float8_e5m2),
    (torch.bfloat16, torch.float8_e5m2),
)


def avx2_attention(head_dim: int) -> bool:
    """Whether the attention kernels run their AVX2 code at `head_dim` on this CPU: AVX2, FMA and
    F16C without AVX-512, head dim 64 (attention.cpp's `__AVX2__ && !__AVX512F__` paths)."""
    flags = cpu_flags().split()
    return (
        head_dim == 64
        and "avx512f" not in flags
        and all(f in flags for f in ("avx2", "fma", "f16c"))
    )


def supports_dtypes(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
    """Whether the attention kernels take queries of `q_dtype` over pools of `kv_dtype`."""
    return (q_dtype, kv_dtype) in KERNEL_DTYPES


def _check_pools(q, k_pool, v_pool, table) -> None:
    if q.device.type != "cpu":
        raise ValueError("the CPU attention kernels run on CPU tensors")
    if k_pool.dtype != v_pool.dtype or not supports_dtypes(q.dtype, k_pool.dtype):
        raise ValueError(
            f"dtypes: q {q.dtype}, k_pool {k_pool.dtype}, v_pool {v_pool.dtype}; the kernels take "
            "float32 or bfloat16 queries over pools of their dtype or of float8_e5m2, or float32 "
            "over bfloat16"
        )
    if (
        q.dim() != 3
        or k_pool.dim() != 3
        or k_pool.shape != v_pool.shape
        or q.shape[2] != k_pool.shape[2]
    ):
        raise ValueError(f"shapes: q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}")
    if q.shape[1] % k_pool.shape[1]:
        raise ValueError("query heads must be a multiple of KV heads")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous() and table.stride(1) == 1):
        raise ValueError("pools and table rows must be contiguous")
    if table.dtype != torch.int64:
        raise ValueError("table must be int64")


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same in plain PyTorch, one request at a time (for tests)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_pool.shape[1]
    for b in range(q.shape[0]):
        slots = table[rows[b], : int(seq_lens[b])]
        k = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out


def extend_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D], the new tokens of every request back to back; request b's tokens sit at
    positions prefix_lens[b] .. + extend_lens[b] - 1 of its table row, whose K/V the pool already
    holds. Each sees keys 0 .. its own position. → out [T, H, D] in q.dtype."""
    _check_pools(q, k_pool, v_pool, table)
    module = extend_module(q, k_pool)
    if q.shape[2] % 64:
        raise ValueError(f"head_dim must be a multiple of 64, not {q.shape[2]}")
    for name, t in (("rows", rows), ("prefix_lens", prefix_lens), ("extend_lens", extend_lens)):
        if t.dtype != torch.int64 or t.shape != rows.shape:
            raise ValueError(f"{name} must be int64 with one entry per request")
    out = module.extend_attention(
        q.contiguous(), k_pool, v_pool, table, rows, prefix_lens, extend_lens, scale
    )
    return out.to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same in plain PyTorch, one request at a time (for tests)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k_pool.shape[1]
    first = 0
    for b in range(rows.shape[0]):
        prefix, n = int(prefix_lens[b]), int(extend_lens[b])
        slots = table[rows[b], : prefix + n]
        k = k_pool[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_pool[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[first : first + n].float(), k) * scale
        visible = torch.arange(prefix + n)[None, :] <= (prefix + torch.arange(n))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[first : first + n] = torch.einsum("hql,lhd->qhd", scores.softmax(-1), v).to(q.dtype)
        first += n
    return out
