"""Shared-prefix attention and the log-sum-exp merge (Triton) against their references."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.merge_attention_states import merge_attention_states_, merge_attention_states_ref
from kernels.shared_prefix_attention import shared_prefix_attention, shared_prefix_attention_ref

TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

CASES = [
    # span lengths per group, tokens per group, num_kv_heads, gqa ratio, head_dim
    pytest.param([1], [1], 1, 1, 64, id="one-key-one-token"),
    pytest.param([100, 7, 65], [4, 1, 9], 3, 3, 64, id="smollm-shape-ragged"),
    pytest.param([33], [20], 2, 8, 128, id="gqa8-many-tokens"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("spans", "tokens", "num_kv_heads", "group", "head_dim"), CASES)
def test_matches_reference(
    make_kv_pool, device, dtype, spans, tokens, num_kv_heads, group, head_dim
):
    k_buffer, v_buffer, req_to_token, group_rows = make_kv_pool(
        spans, num_kv_heads, head_dim, dtype, torch.int64
    )
    # q: [N, H, D], the tokens of every group back to back
    q = torch.randn(sum(tokens), num_kv_heads * group, head_dim).to(dtype).to(device)
    offsets = torch.tensor([0, *tokens], device=device).cumsum(0)
    lens = torch.tensor(spans, device=device)
    args = (q, k_buffer, v_buffer, req_to_token, group_rows, offsets, lens, 1 / math.sqrt(head_dim))
    out, lse = shared_prefix_attention(*args)
    ref_out, ref_lse = shared_prefix_attention_ref(*args)
    torch.testing.assert_close(out, ref_out, **TOLERANCES[dtype])
    torch.testing.assert_close(lse, ref_lse, **TOLERANCES[dtype])


def test_rejects_mismatched_inputs(make_kv_pool, device):
    k_buffer, v_buffer, req_to_token, rows = make_kv_pool([5], 1, 64, torch.float32, torch.int64)
    q = torch.randn(2, 3, 64, device=device)
    offsets, lens = torch.tensor([0, 2], device=device), torch.tensor([5], device=device)
    with pytest.raises(ValueError, match="dtypes"):
        shared_prefix_attention(
            q.double(), k_buffer, v_buffer, req_to_token, rows, offsets, lens, 1
        )
    with pytest.raises(ValueError, match="tok_offsets"):
        shared_prefix_attention(q, k_buffer, v_buffer, req_to_token, rows, lens, lens, 1.0)


def test_merge_matches_reference_and_full_attention(device):
    gen = torch.Generator().manual_seed(0)
    o, part_o = (torch.randn(n, 9, 64, generator=gen).to(device) for n in (6, 3))
    lse, part_lse = (torch.randn(n, 9, generator=gen).to(device) for n in (6, 3))
    idx = torch.tensor([4, 0, 2], device=device)
    ref_o, ref_lse = merge_attention_states_ref(o, lse, part_o, part_lse, idx)
    merge_attention_states_(o, lse, part_o, part_lse, idx)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
