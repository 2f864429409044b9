"""The C++ CPU decode-attention kernel against its PyTorch reference, and inside the engine."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as cpu_kernels
from tests.executor.driver import Driver
from tests.executor.tiny import engine_for, hf_model

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

pytestmark = pytest.mark.skipif(
    cpu_kernels.load() is None, reason=f"kernel not built: {cpu_kernels.load_error()}"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 64), (9, 3, 64), (8, 1, 128)])
@pytest.mark.parametrize("batch", [6, 40])  # split by kv head / one task per request
def test_kernel_matches_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, batch: int
) -> None:
    gen = torch.Generator().manual_seed(heads * dim)
    slots = 3000
    k_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    k_pool[0] = float("nan")  # the padding slot must never be read
    table = torch.randint(1, slots, (10, 300), generator=gen)
    rows = torch.tensor([7, 0, 3, 9, 1, 5] * (batch // 6) + [2] * (batch % 6))
    seq_lens = torch.tensor([1, 299, 17, 64, 2, 150] * (batch // 6) + [33] * (batch % 6))
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    out = cpu_kernels.paged_decode_attention(q, k_pool, v_pool, table, rows, seq_lens, dim**-0.5)
    ref = cpu_kernels.paged_decode_attention_ref(
        q, k_pool, v_pool, table, rows, seq_lens, dim**-0.5
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max().item() < TOLERANCE[dtype]


def test_launcher_rejects_bad_inputs() -> None:
    q = torch.randn(2, 4, 64)
    pool = torch.randn(10, 2, 64)
    table = torch.zeros(4, 8, dtype=torch.int64)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dtypes"):
        cpu_kernels.paged_decode_attention(q, pool.bfloat16(), pool, table, idx, idx, 0.1)
    with pytest.raises(ValueError, match="int64"):
        cpu_kernels.paged_decode_attention(q, pool, pool, table.int(), idx, idx, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        cpu_kernels.paged_decode_attention(torch.randn(2, 3, 64), pool, pool, table, idx, idx, 0.1)


def test_engine_gives_same_tokens_with_and_without_the_kernel() -> None:
    hf = hf_model("llama31")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], list(range(40, 100))]
    with_kernel = engine_for(hf)
    assert with_kernel.attn.use_cpu_kernel
    without = engine_for(hf)
    without.attn.use_cpu_kernel = False
    a = [j.output for j in Driver(with_kernel).generate(prompts, 16)]
    b = [j.output for j in Driver(without).generate(prompts, 16)]
    assert a == b
