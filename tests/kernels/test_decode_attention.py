from __future__ import annotations

import math

import pytest
import torch

from kernels.decode_attention import decode_attention, decode_attention_ref

# bf16: the kernel rounds the softmax weights to bf16 before P·V (as tensor cores need), and the
# interpreter truncates float32 -> bf16 where a GPU rounds to nearest, so allow a few bf16 ulps.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# (q dtype, K/V buffer dtype): one dtype, a float32 model over a bfloat16 KV cache, or either
# over a float8 one; the tolerance is that of the dtype P is rounded to (the values' dtype, the
# queries' over float8 values)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float8_e5m2),
    (torch.bfloat16, torch.float8_e5m2),
]

CASES = [
    # seq_lens, num_kv_heads, gqa ratio, head_dim, num_kv_splits, req_to_token dtype
    pytest.param([1], 2, 1, 64, 8, torch.int32, id="len1-more-splits-than-keys"),
    pytest.param([1, 7, 100, 65], 2, 3, 64, 4, torch.int64, id="ragged-gqa3"),
    pytest.param([33, 2, 97], 1, 8, 128, 3, torch.int32, id="gqa8-d128"),
    pytest.param([64, 128], 2, 1, 64, 1, torch.int64, id="block-multiples-one-split"),
]


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize(
    ("seq_lens", "num_kv_heads", "group", "head_dim", "splits", "index"), CASES
)
def test_matches_reference(
    make_kv_pool, device, dtype, kv_dtype, seq_lens, num_kv_heads, group, head_dim, splits, index
):
    k_buffer, v_buffer, req_to_token, req_rows = make_kv_pool(
        seq_lens, num_kv_heads, head_dim, kv_dtype, index
    )
    # q: [batch, num_heads, head_dim]
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim).to(dtype).to(device)
    lens = torch.tensor(seq_lens, dtype=index, device=device)
    args = (q, k_buffer, v_buffer, req_to_token, req_rows, lens, 1 / math.sqrt(head_dim))

    out = decode_attention(*args, num_kv_splits=splits)

    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(
        out,
        decode_attention_ref(*args),
        **TOLERANCES[dtype if kv_dtype == torch.float8_e5m2 else kv_dtype],
    )


def test_split_count_does_not_change_the_result(make_kv_pool, device):
    k_buffer, v_buffer, req_to_token, req_rows = make_kv_pool([90, 3], 2, 64, torch.float32)
    q = torch.randn(2, 4, 64, device=device)
    lens = torch.tensor([90, 3], dtype=torch.int32, device=device)
    args = (q, k_buffer, v_buffer, req_to_token, req_rows, lens, 0.125)
    one, many = (decode_attention(*args, num_kv_splits=n) for n in (1, 7))
    torch.testing.assert_close(one, many, **TOLERANCES[torch.float32])


def test_empty_batch(device):
    args = _valid_inputs(device)
    args.update(q=args["q"][:0], req_rows=args["req_rows"][:0], seq_lens=args["seq_lens"][:0])
    assert decode_attention(**args).shape == (0, 4, 64)


def _valid_inputs(device: str) -> dict:
    return dict(
        q=torch.randn(2, 4, 64, device=device),
        k_buffer=torch.randn(9, 2, 64, device=device),
        v_buffer=torch.randn(9, 2, 64, device=device),
        req_to_token=torch.zeros(3, 8, dtype=torch.int32, device=device),
        req_rows=torch.tensor([0, 1], device=device),
        seq_lens=torch.tensor([1, 2], device=device),
        sm_scale=0.125,
    )


BAD_INPUTS = {
    "q-2d": lambda a: a.update(q=a["q"][0]),
    "head-dim-mismatch": lambda a: a.update(q=a["q"][..., :32].contiguous()),
    "head-dim-not-power-of-two": lambda a: a.update(
        **{n: a[n][..., :48].contiguous() for n in ("q", "k_buffer", "v_buffer")}
    ),
    "heads-not-multiple-of-kv-heads": lambda a: a.update(q=a["q"][:, :3].contiguous()),
    "k-v-shape-mismatch": lambda a: a.update(v_buffer=a["v_buffer"][:8]),
    "dtype-mismatch": lambda a: a.update(k_buffer=a["k_buffer"].bfloat16()),
    "bf16-q-over-f32-buffers": lambda a: a.update(q=a["q"].bfloat16()),
    "integer-q": lambda a: a.update(q=a["q"].long()),
    "float-table": lambda a: a.update(req_to_token=a["req_to_token"].float()),
    "strided-head-dim": lambda a: a.update(q=a["q"].transpose(1, 2).contiguous().transpose(1, 2)),
    "seq-lens-wrong-length": lambda a: a.update(seq_lens=a["seq_lens"][:1]),
    "float-seq-lens": lambda a: a.update(seq_lens=a["seq_lens"].float()),
    "zero-splits": lambda a: a.update(num_kv_splits=0),
    "other-device": lambda a: a.update(seq_lens=a["seq_lens"].to("meta")),
}


@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(device, corrupt):
    args = _valid_inputs(device)
    corrupt(args)
    with pytest.raises(ValueError):
        decode_attention(**args)
