from __future__ import annotations

import math

import pytest
import torch

from kernels.decode_attention import decode_attention
from kernels.extend_attention import extend_attention, extend_attention_ref

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
    # prefix_lens, extend_lens, num_kv_heads, gqa ratio, head_dim, req_to_token dtype
    pytest.param([0], [1], 2, 1, 64, torch.int32, id="one-token-no-prefix"),
    pytest.param([0, 5, 70, 0], [100, 1, 30, 65], 2, 3, 64, torch.int64, id="ragged-gqa3"),
    pytest.param([17, 0], [47, 3], 1, 8, 128, torch.int32, id="gqa8-d128"),
    pytest.param([64], [64], 2, 1, 64, torch.int64, id="block-multiples"),
]


def _ragged_batch(prefix_lens, extend_lens, num_heads, head_dim, dtype, index, device):
    """q for all new tokens, with the requests' slices of q stored in a shuffled order."""
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(len(extend_lens), generator=gen).tolist()
    qo_start = [0] * len(extend_lens)
    offset = 0
    for i in order:
        qo_start[i], offset = offset, offset + extend_lens[i]
    # q: [total_new_tokens, num_heads, head_dim]
    q = torch.randn(offset, num_heads, head_dim, generator=gen).to(dtype).to(device)
    lens = [
        torch.tensor(x, dtype=index, device=device) for x in (prefix_lens, extend_lens, qo_start)
    ]
    return q, *lens


@pytest.mark.parametrize(("dtype", "kv_dtype"), DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize(
    ("prefix_lens", "extend_lens", "num_kv_heads", "group", "head_dim", "index"), CASES
)
def test_matches_reference(
    make_kv_pool,
    device,
    dtype,
    kv_dtype,
    prefix_lens,
    extend_lens,
    num_kv_heads,
    group,
    head_dim,
    index,
):
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    k_buffer, v_buffer, req_to_token, req_rows = make_kv_pool(
        seq_lens, num_kv_heads, head_dim, kv_dtype, index
    )
    q, prefix, extend, qo_start = _ragged_batch(
        prefix_lens, extend_lens, num_kv_heads * group, head_dim, dtype, index, device
    )
    args = (q, k_buffer, v_buffer, req_to_token, req_rows, prefix, extend, qo_start)
    sm_scale = 1 / math.sqrt(head_dim)

    out = extend_attention(*args, sm_scale)

    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(
        out,
        extend_attention_ref(*args, sm_scale),
        **TOLERANCES[dtype if kv_dtype == torch.float8_e5m2 else kv_dtype],
    )


def test_one_new_token_matches_decode(make_kv_pool, device):
    seq_lens = [1, 40, 90]
    k_buffer, v_buffer, req_to_token, req_rows = make_kv_pool(seq_lens, 2, 64, torch.float32)
    q = torch.randn(3, 6, 64, device=device)
    lens = torch.tensor(seq_lens, device=device)
    ones = torch.ones_like(lens)
    pool = (k_buffer, v_buffer, req_to_token, req_rows)

    qo_start = torch.arange(3, device=device)
    extend = extend_attention(q, *pool, lens - 1, ones, qo_start, 0.125, max_extend_len=1)
    decode = decode_attention(q, *pool, lens, 0.125, num_kv_splits=4)

    torch.testing.assert_close(extend, decode, **TOLERANCES[torch.float32])


def test_no_requests(device):
    args = _valid_inputs(device)
    names = ("req_rows", "prefix_lens", "extend_lens", "qo_start")
    args.update(q=args["q"][:0], **{n: args[n][:0] for n in names})
    assert extend_attention(**args).shape == (0, 4, 64)


def _valid_inputs(device: str) -> dict:
    return dict(
        q=torch.randn(3, 4, 64, device=device),
        k_buffer=torch.randn(9, 2, 64, device=device),
        v_buffer=torch.randn(9, 2, 64, device=device),
        req_to_token=torch.zeros(3, 8, dtype=torch.int32, device=device),
        req_rows=torch.tensor([0, 1], device=device),
        prefix_lens=torch.tensor([0, 2], device=device),
        extend_lens=torch.tensor([2, 1], device=device),
        qo_start=torch.tensor([0, 2], device=device),
        sm_scale=0.125,
    )


BAD_INPUTS = {
    "q-2d": lambda a: a.update(q=a["q"][0]),
    "head-dim-mismatch": lambda a: a.update(q=a["q"][..., :32].contiguous()),
    "heads-not-multiple-of-kv-heads": lambda a: a.update(q=a["q"][:, :3].contiguous()),
    "dtype-mismatch": lambda a: a.update(v_buffer=a["v_buffer"].half()),
    "bf16-q-over-f32-buffers": lambda a: a.update(q=a["q"].bfloat16()),
    "float-table": lambda a: a.update(req_to_token=a["req_to_token"].float()),
    "1d-table": lambda a: a.update(req_to_token=a["req_to_token"][0]),
    "strided-pool": lambda a: a.update(
        k_buffer=a["k_buffer"].transpose(0, 2).contiguous().transpose(0, 2)
    ),
    "qo-start-wrong-length": lambda a: a.update(qo_start=a["qo_start"][:1]),
    "float-extend-lens": lambda a: a.update(extend_lens=a["extend_lens"].float()),
    "other-device": lambda a: a.update(prefix_lens=a["prefix_lens"].to("meta")),
}


@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_rejects_bad_inputs(device, corrupt):
    args = _valid_inputs(device)
    corrupt(args)
    with pytest.raises(ValueError):
        extend_attention(**args)
