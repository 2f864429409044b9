"""Shared-prefix attention, each row's own keys after it (decode and extend, with log-sum-exps)
and the log-sum-exp merge (Triton) against their references, and the three together against
plain attention over every key."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.cpu.cascade import extend_attention_lse_ref, paged_decode_attention_lse_ref
from kernels.decode_attention import decode_attention, decode_attention_lse
from kernels.extend_attention import extend_attention, extend_attention_lse
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


def _cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The references of kernels/cpu/cascade.py build their outputs on the CPU."""
    return [t.cpu() for t in tensors]


# (q dtype, K/V buffer dtype) as decode_attention takes them; tolerance of the dtype p is rounded to
OWN_KEY_DTYPES = [
    pytest.param(torch.float32, torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, torch.bfloat16, id="bf16"),
    pytest.param(torch.float32, torch.bfloat16, torch.bfloat16, id="fp32-over-bf16"),
]


@pytest.mark.parametrize(("dtype", "kv_dtype", "tol"), OWN_KEY_DTYPES)
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_own_keys_match_reference(make_kv_pool, device, dtype, kv_dtype, tol, splits):
    # Keys from 0 (no span), from the middle, the last key alone, and fewer keys than splits.
    seq_lens, key_starts = [90, 70, 33, 5], [0, 41, 32, 2]
    k_buffer, v_buffer, table, rows = make_kv_pool(seq_lens, 3, 64, kv_dtype, torch.int64)
    q = torch.randn(len(seq_lens), 9, 64).to(dtype).to(device)
    starts = torch.tensor(key_starts, dtype=torch.int32, device=device)  # int32 beside int64
    lens = torch.tensor(seq_lens, device=device)
    out, lse = decode_attention_lse(
        q, k_buffer, v_buffer, table, rows, starts, lens, 0.125, num_kv_splits=splits
    )
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (4, 9)
    ref_out, ref_lse = paged_decode_attention_lse_ref(
        *_cpu(q, k_buffer, v_buffer, table, rows, starts, lens), 0.125
    )
    torch.testing.assert_close(out.cpu(), ref_out, **TOLERANCES[tol])
    torch.testing.assert_close(lse.cpu(), ref_lse, **TOLERANCES[tol])


@pytest.mark.parametrize(("dtype", "kv_dtype", "tol"), OWN_KEY_DTYPES)
def test_extend_own_keys_match_reference(make_kv_pool, device, dtype, kv_dtype, tol):
    # A request of more than one query block (70 > 64) over keys from 4; one whose keys start
    # at its prefix's end (its own tokens only); one without a prefix or span.
    prefix, extend, key_starts = [10, 40, 0], [70, 1, 5], [4, 40, 0]
    seq_lens = [p + n for p, n in zip(prefix, extend, strict=True)]
    k_buffer, v_buffer, table, rows = make_kv_pool(seq_lens, 3, 64, kv_dtype, torch.int64)
    q = torch.randn(sum(extend), 9, 64).to(dtype).to(device)
    starts, prefix_lens, extend_lens = (
        torch.tensor(x, device=device) for x in (key_starts, prefix, extend)
    )
    qo_start = extend_lens.cumsum(0) - extend_lens
    out, lse = extend_attention_lse(
        q, k_buffer, v_buffer, table, rows, starts, prefix_lens, extend_lens, qo_start, 0.125
    )
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == (76, 9)
    ref_out, ref_lse = extend_attention_lse_ref(
        *_cpu(q, k_buffer, v_buffer, table, rows, starts, prefix_lens, extend_lens), 0.125
    )
    torch.testing.assert_close(out.cpu(), ref_out, **TOLERANCES[tol])
    torch.testing.assert_close(lse.cpu(), ref_lse, **TOLERANCES[tol])


def test_span_then_own_keys_merged_equal_plain_attention(make_kv_pool, device):
    """Two groups share spans of 50 and 7 positions of one pool row: each member's part over the
    span, merged into its part over its own keys, is its attention over every key."""
    span_lens, own = [50, 7], [[1, 1, 1], [12, 1]]  # group 1: an extend of 12 and a decode
    members = [n for group in own for n in group]
    k_buffer, v_buffer, table, rows = make_kv_pool(
        [s + n for s, group in zip(span_lens, own, strict=True) for n in group],
        3, 64, torch.float32, torch.int64,
    )  # fmt: skip
    # Members of a group map the span to the slots of the group's first row.
    first = [0, 3]
    for g, span in enumerate(span_lens):
        for m in range(first[g] + 1, first[g] + len(own[g])):
            table[rows[m], :span] = table[rows[first[g]], :span]
    span_of = [span_lens[0]] * 3 + [span_lens[1]] * 2
    seq_lens = [s + n for s, n in zip(span_of, members, strict=True)]
    extend_idx, decode_idx = [3], [0, 1, 2, 4]
    q = torch.randn(sum(members), 9, 64, device=device)  # extend tokens first, then decodes
    scale = 0.125

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=device)

    ext = dict(prefix=tensor([span_lens[1]]), extend=tensor([12]), rows=rows[extend_idx])
    dec = dict(rows=rows[decode_idx], lens=tensor([seq_lens[i] for i in decode_idx]))
    q_ext, q_dec = q[:12], q[12:]
    want = torch.cat([
        extend_attention(q_ext, k_buffer, v_buffer, table, ext["rows"], ext["prefix"],
                         ext["extend"], tensor([0]), scale),
        decode_attention(q_dec, k_buffer, v_buffer, table, dec["rows"], dec["lens"], scale),
    ])  # fmt: skip

    out_e, lse_e = extend_attention_lse(
        q_ext, k_buffer, v_buffer, table, ext["rows"], tensor([span_lens[1]]), ext["prefix"],
        ext["extend"], tensor([0]), scale,
    )  # fmt: skip
    starts = tensor([span_of[i] for i in decode_idx])
    out_d, lse_d = decode_attention_lse(
        q_dec, k_buffer, v_buffer, table, dec["rows"], starts, dec["lens"], scale
    )
    out, lse = torch.cat([out_e, out_d]), torch.cat([lse_e, lse_d])
    # Group 0: the three decodes (tokens 12..14); group 1: the extend's 12 tokens and a decode.
    tok_idx = tensor([12, 13, 14, *range(12), 15])
    part_o, part_lse = shared_prefix_attention(
        q[tok_idx], k_buffer, v_buffer, table, rows[first], tensor([0, 3, 16]),
        tensor(span_lens), scale,
    )  # fmt: skip
    merge_attention_states_(out, lse, part_o, part_lse, tok_idx)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float32])


def test_own_keys_reject_bad_key_starts(make_kv_pool, device):
    k_buffer, v_buffer, table, rows = make_kv_pool([9, 9], 1, 64, torch.float32, torch.int64)
    q = torch.randn(2, 2, 64, device=device)
    lens = torch.tensor([9, 9], device=device)
    with pytest.raises(ValueError, match="key_starts"):
        decode_attention_lse(q, k_buffer, v_buffer, table, rows, lens[:1], lens, 0.125)
    with pytest.raises(ValueError, match="key_starts"):
        extend_attention_lse(
            q, k_buffer, v_buffer, table, rows, lens.float(), lens - 1, lens - 8, lens * 0, 0.125
        )


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float8_e5m2),
        (torch.bfloat16, torch.float8_e5m2),
    ],
    ids=["fp32-over-bf16", "fp32-over-fp8", "bf16-over-fp8"],
)
def test_span_over_a_cache_in_another_dtype(make_kv_pool, device, dtype, kv_dtype):
    """As decode_attention takes them: p is rounded to the values' dtype over a bfloat16 cache,
    to the queries' over a float8 one."""
    k_buffer, v_buffer, table, rows = make_kv_pool([70, 9], 3, 64, kv_dtype, torch.int64)
    q = torch.randn(5, 9, 64).to(dtype).to(device)
    args = (q, k_buffer, v_buffer, table, rows, torch.tensor([0, 3, 5], device=device),
            torch.tensor([70, 9], device=device), 0.125)  # fmt: skip
    out, lse = shared_prefix_attention(*args)
    ref_out, ref_lse = shared_prefix_attention_ref(*args)
    tol = TOLERANCES[torch.bfloat16]  # p in bfloat16, or float8 values
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
