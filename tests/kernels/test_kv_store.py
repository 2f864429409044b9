from __future__ import annotations

import pytest
import torch

from kernels.kv_store import store_kv, store_kv_ref

# A store is a copy: results must match bit for bit in every dtype.
TOLERANCES = {torch.float32: dict(atol=0, rtol=0), torch.bfloat16: dict(atol=0, rtol=0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("num_tokens", "num_kv_heads", "head_dim", "index"),
    [(1, 2, 64, torch.int32), (37, 3, 128, torch.int64), (5, 1, 80, torch.int32)],
)
def test_matches_reference(device, dtype, num_tokens, num_kv_heads, head_dim, index):
    gen = torch.Generator().manual_seed(0)
    num_slots = 3 * num_tokens + 1
    # k, v: views into one fused qkv projection, strided along tokens like the executor's
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen).to(dtype).to(device)
    k, v = (t.view(num_tokens, num_kv_heads, head_dim) for t in qkv.chunk(3, dim=1)[1:])
    loc = (torch.randperm(num_slots - 1, generator=gen)[:num_tokens] + 1).to(index).to(device)
    pool = torch.randn(2, num_slots, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    expected = pool.clone()

    store_kv(k, v, pool[0], pool[1], loc)
    store_kv_ref(k, v, expected[0], expected[1], loc)

    torch.testing.assert_close(pool, expected, **TOLERANCES[dtype])


def test_narrower_buffers_get_the_values_rounded(device):
    """float32 K/V into bfloat16 buffers (--kv-cache-dtype bfloat16): each stored value is the
    float32 one in bfloat16, within one bfloat16 ulp (the interpreter truncates, a GPU rounds)."""
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(6, 2, 64, generator=gen).to(device) for _ in range(2))
    loc = torch.tensor([9, 2, 4, 11, 1, 7], device=device)
    buffers = torch.zeros(2, 12, 2, 64, dtype=torch.bfloat16, device=device)
    store_kv(k, v, buffers[0], buffers[1], loc)
    for stored, value in ((buffers[0][loc], k), (buffers[1][loc], v)):
        assert stored.dtype == torch.bfloat16
        torch.testing.assert_close(stored.float(), value, atol=0, rtol=2**-7)
    untouched = torch.ones(12, dtype=torch.bool, device=device)
    untouched[loc] = False
    assert (buffers[:, untouched] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_float8_buffers_get_torch_rounding_saturated(device, dtype):
    """K/V into float8 e5m2 buffers (--kv-cache-dtype fp8_e5m2): each stored byte is torch's own
    rounding of the value (to nearest even), values past the largest finite one (57,344)
    saturate to it instead of becoming infinite, and slots not written stay as they were."""
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randn(6, 2, 64, generator=gen).mul(4).to(dtype).to(device) for _ in range(2))
    k[0, 0, :3] = torch.tensor([1e5, -7e4, 60000.0])
    loc = torch.tensor([9, 2, 4, 11, 1, 7], device=device)
    buffers = torch.zeros(2, 12, 2, 64, dtype=torch.float8_e5m2, device=device)
    expected = buffers.clone()
    store_kv(k, v, buffers[0], buffers[1], loc)
    store_kv_ref(k, v, expected[0], expected[1], loc)
    assert torch.equal(buffers.view(torch.uint8), expected.view(torch.uint8))
    assert buffers[0][9, 0, :3].float().tolist() == [57344.0, -57344.0, 57344.0]
    assert torch.equal(buffers[1][loc].float(), v.float().to(torch.float8_e5m2).float())
    untouched = torch.ones(12, dtype=torch.bool, device=device)
    untouched[loc] = False
    assert (buffers[:, untouched].float() == 0).all()


def _valid_inputs(device: str) -> dict:
    return dict(
        k=torch.randn(3, 2, 64, device=device),
        v=torch.randn(3, 2, 64, device=device),
        k_buffer=torch.zeros(9, 2, 64, device=device),
        v_buffer=torch.zeros(9, 2, 64, device=device),
        out_cache_loc=torch.tensor([4, 1, 7], device=device),
    )


BAD_INPUTS = {
    "k-2d": lambda a: a.update(k=a["k"][0]),
    "k-v-shape-mismatch": lambda a: a.update(v=a["v"][:2]),
    "heads-mismatch": lambda a: a.update(k_buffer=a["k_buffer"][:, :1]),
    "buffers-mismatch": lambda a: a.update(v_buffer=a["v_buffer"][:5]),
    "dtype-mismatch": lambda a: a.update(k=a["k"].bfloat16()),
    "float-loc": lambda a: a.update(out_cache_loc=a["out_cache_loc"].float()),
    "loc-wrong-length": lambda a: a.update(out_cache_loc=a["out_cache_loc"][:2]),
    "strided-head-dim": lambda a: a.update(k=a["k"].transpose(1, 2).contiguous().transpose(1, 2)),
    "other-device": lambda a: a.update(out_cache_loc=a["out_cache_loc"].to("meta")),
}


@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(device, corrupt):
    args = _valid_inputs(device)
    corrupt(args)
    with pytest.raises(ValueError):
        store_kv(**args)
