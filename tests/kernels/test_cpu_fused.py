"""The fused CPU layer kernels against their PyTorch references (HF's formulas)."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu import fused

pytestmark = pytest.mark.skipif(
    fused._fused.load() is None, reason=f"kernel not built: {fused._fused.error}"
)
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "dim"), [(1, 576), (7, 576), (64, 576), (3, 100), (2, 7)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_reference(dtype, tokens, dim, with_residual):
    # 576 is SmolLM2-135M's hidden size; 100 and 7 end mid-vector (16 values a vector)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, dim, generator=gen).to(dtype)
    res = torch.randn(tokens, dim, generator=gen).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    out, total = fused.add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_total = fused.add_rmsnorm_ref(x, res, w, 1e-5)
    if with_residual:
        assert torch.equal(total, ref_total)  # the residual stream is exact
    else:
        assert total is None and ref_total is None
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    else:  # at most one bf16 ulp, where the float32 mean of squares adds in another order
        torch.testing.assert_close(out, ref_out, atol=0.0, rtol=2**-7)
        assert (out == ref_out).float().mean() > (0.99 if dim > 64 else 0.8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (5, 1536), (33, 1536), (4, 37)])
def test_silu_and_mul_matches_reference(dtype, tokens, inter):
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(tokens, 2 * inter, generator=gen)).to(dtype)
    out = fused.silu_and_mul(x)
    ref = fused.silu_and_mul_ref(x)
    assert out.shape == (tokens, inter)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    else:  # exp may differ from PyTorch's in the last float bit, rarely visible in bfloat16
        torch.testing.assert_close(out, ref, atol=0.0, rtol=2**-7)
        assert (out == ref).float().mean() > 0.995


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_very_negative_gates_is_zero_not_nan(dtype):
    # e^-g overflows float32 below g = -88.72: PyTorch's silu gives -0 there, where g / inf under
    # -ffast-math gave NaN. A NaN gate gives NaN and +inf gives inf, as in PyTorch. 26 and 22
    # values: the vector rows end in a masked tail.
    nan, inf = float("nan"), float("inf")
    gate = torch.tensor(
        [-88.8, -89.0, -100.0, -1e4, -1e8, -1e10, -1e38, -3e38, 0.5, -0.5, 30.0, 1e10, -88.0] * 2
    )
    special = torch.tensor([nan, inf])
    for g in (gate, torch.cat([gate[:20], special])):
        x = torch.cat([g, torch.full_like(g, 2.0)])[None].to(dtype)
        out, ref = fused.silu_and_mul(x), fused.silu_and_mul_ref(x)
        assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
        torch.testing.assert_close(out, ref, atol=1e-30, rtol=2**-7, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4)])
def test_rope_matches_reference(dtype, heads, kv_heads):
    dim, tokens, max_pos = 64, 11, 4096
    gen = torch.Generator().manual_seed(heads)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    q, k = fused.rope(qkv, positions, cos, sin, heads, kv_heads, dim)
    ref_q, ref_k = fused.rope_ref(qkv, positions, cos, sin, heads, kv_heads, dim)
    assert q.shape == (tokens, heads, dim) and k.shape == (tokens, kv_heads, dim)
    if dtype == torch.bfloat16:  # every product is rounded as HF rounds it: bit for bit
        assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    else:  # float32 products may be fused into one multiply-add
        torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k, ref_k, atol=1e-6, rtol=1e-6)


def _rope_tables(dim: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "tokens"), [(9, 3, 1), (9, 3, 16), (4, 4, 5)])
def test_rope_store_writes_what_rope_and_two_stores_write(dtype, heads, kv_heads, tokens):
    dim, slots = 64, 40
    cos, sin = _rope_tables(dim, 512)
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    loc = torch.randperm(slots, generator=gen)[:tokens]
    pools = [torch.randn(slots, kv_heads, dim, generator=gen).to(dtype) for _ in range(2)]
    k_pool, v_pool = (p.clone() for p in pools)
    ref_k, ref_v = (p.clone() for p in pools)
    q = fused.rope_store(qkv, positions, cos, sin, heads, kv_heads, dim, k_pool, v_pool, loc)
    ref_q = fused.rope_store_ref(qkv, positions, cos, sin, heads, kv_heads, dim, ref_k, ref_v, loc)
    _, k = fused.rope_ref(qkv, positions, cos, sin, heads, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    if dtype == torch.bfloat16:  # bit for bit, as rope
        assert torch.equal(q, ref_q) and torch.equal(k_pool, ref_k)
        assert torch.equal(k_pool[loc], k)
    else:
        torch.testing.assert_close(q, ref_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(k_pool, ref_k, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_pool, ref_v) and torch.equal(v_pool[loc], v)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc] = False
    for pool, before in zip((k_pool, v_pool), pools, strict=True):
        assert torch.equal(pool[untouched], before[untouched])  # no other slot changes


def test_rope_store_under_a_narrower_pool_rounds_as_store_rows():
    heads, kv_heads, dim, slots = 2, 1, 64, 8
    cos, sin = _rope_tables(dim, 16)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=torch.Generator().manual_seed(3))
    positions, loc = torch.tensor([0, 5, 15]), torch.tensor([7, 0, 3])
    k_pool, v_pool = (torch.zeros(slots, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    q = fused.rope_store(qkv, positions, cos, sin, heads, kv_heads, dim, k_pool, v_pool, loc)
    ref_q, ref_k = fused.rope(qkv, positions, cos, sin, heads, kv_heads, dim)
    assert torch.equal(q, ref_q)
    assert torch.equal(k_pool[loc], ref_k.bfloat16())
    assert torch.equal(v_pool[loc], qkv[:, 3 * dim :].view(3, 1, dim).bfloat16())


def test_rope_store_rejects_a_slot_outside_the_pools():
    cos = sin = torch.zeros(8, 32)
    qkv = torch.zeros(2, 3 * 64)
    k_pool, v_pool = torch.zeros(4, 1, 64), torch.zeros(4, 1, 64)
    with pytest.raises(RuntimeError, match="outside the pool"):
        fused.rope_store(
            qkv, torch.tensor([0, 1]), cos, sin, 1, 1, 64, k_pool, v_pool, torch.tensor([0, 4])
        )
    assert not k_pool.any() and not v_pool.any()


def test_rope_rejects_a_position_outside_the_table():
    cos = sin = torch.zeros(8, 32)
    qkv = torch.zeros(2, 3 * 64)
    with pytest.raises(RuntimeError, match="outside the rotary table"):
        fused.rope(qkv, torch.tensor([0, 8]), cos, sin, 1, 1, 64)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 49152), (16, 49152), (33, 1000), (3, 17), (2, 5)])
def test_argmax_is_torchs_on_random_rows(rows, vocab):
    # 49,152 is SmolLM2's vocabulary; 1,000, 17 and 5 end mid-vector (AVX-512: 16 values, AVX2: 8)
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(fused.argmax(x), x.argmax(-1))


def test_argmax_takes_the_first_of_equal_maxima_and_the_first_nan():
    x = torch.full((8, 100), -float("inf"))  # row 0: all -inf, index 0
    x[1, [40, 7, 99, 23]] = 5.0  # ties in different lanes and vectors: the first
    x[2, [3, 19, 35]] = 2.0  # ties in one lane
    x[3, 98] = 1.0  # in the tail
    x[4, [10, 60]] = float("nan")  # NaN wins, the first one
    x[4, 5] = 1e30
    x[5, 97] = float("nan")  # a NaN in the tail
    x[6, 0] = float("nan")
    x[7] = torch.arange(100.0).flip(0)  # the largest at 0
    assert fused.argmax(x).tolist() == [0, 7, 3, 98, 10, 97, 0, 0]
    assert torch.equal(fused.argmax(x), x.argmax(-1))
    assert torch.equal(fused.argmax(x[:, :12].contiguous()), x[:, :12].argmax(-1))


def test_disabled_kernels_use_the_reference(monkeypatch):
    monkeypatch.setenv("RADIXSERVE_DISABLE_CPU_KERNELS", "1")
    assert fused.available(torch.zeros(1)) is None
