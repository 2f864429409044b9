"""Merges two partial attentions of the same queries over disjoint keys, by log-sum-exp.

out_a (softmax over keys A) and out_b (over keys B) of one query head combine exactly into the
attention over A ∪ B: with lse = log(e^{lse_a} + e^{lse_b}),
    out = e^{lse_a - lse} out_a + e^{lse_b - lse} out_b.
The shared-prefix path merges each grouped token's shared-span part (out_b, one entry per grouped
token) into its own-keys part (out_a, all tokens) in place; one program per grouped token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    o_ptr,  # [T, num_heads, head_dim] float32, merged in place
    lse_ptr,  # [T, num_heads] float32, merged in place
    part_o_ptr,  # [N, num_heads, head_dim] float32
    part_lse_ptr,  # [N, num_heads] float32
    idx_ptr,  # [N] token of each part entry
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i = tl.program_id(0)
    t = tl.load(idx_ptr + i).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    h_mask = h < num_heads
    d = tl.arange(0, HEAD_DIM)
    a = tl.load(lse_ptr + t * num_heads + h, mask=h_mask, other=0.0)
    b = tl.load(part_lse_ptr + i * num_heads + h, mask=h_mask, other=0.0)
    m = tl.maximum(a, b)
    wa, wb = tl.exp(a - m), tl.exp(b - m)
    offs = h[:, None] * HEAD_DIM + d[None, :]
    oa = tl.load(o_ptr + t * num_heads * HEAD_DIM + offs, mask=h_mask[:, None], other=0.0)
    ob = tl.load(part_o_ptr + i * num_heads * HEAD_DIM + offs, mask=h_mask[:, None], other=0.0)
    merged = (oa * wa[:, None] + ob * wb[:, None]) / (wa + wb)[:, None]
    tl.store(o_ptr + t * num_heads * HEAD_DIM + offs, merged, mask=h_mask[:, None])
    tl.store(lse_ptr + t * num_heads + h, m + tl.log(wa + wb), mask=h_mask)


def merge_attention_states_(
    o: torch.Tensor,
    lse: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """o [T, H, D] / lse [T, H] ← merged in place with part_o [N, H, D] / part_lse [N, H] at
    tokens idx [N] (distinct). All float32, contiguous, one device. Returns o.
    Raises ValueError on mismatched shapes, dtypes or layouts."""
    for name, t in (("o", o), ("lse", lse), ("part_o", part_o), ("part_lse", part_lse)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != o.device:
            raise ValueError(f"{name} must be contiguous float32 on {o.device}")
    if lse.shape != o.shape[:2] or part_lse.shape != part_o.shape[:2]:
        raise ValueError("lse must be [T, H] and part_lse [N, H]")
    if part_o.shape[1:] != o.shape[1:] or idx.shape != part_o.shape[:1]:
        raise ValueError(f"shapes: o {tuple(o.shape)}, part_o {tuple(part_o.shape)}")
    if idx.dtype not in (torch.int32, torch.int64) or idx.device != o.device:
        raise ValueError("idx must be int32/int64 on o's device")
    head_dim = o.shape[2]
    if head_dim & (head_dim - 1):
        raise ValueError("head_dim must be a power of two")
    if idx.shape[0]:
        _merge_kernel[(idx.shape[0],)](
            o, lse, part_o, part_lse, idx, o.shape[1],
            HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(o.shape[1]), num_warps=4,
        )  # fmt: skip
    return o


def merge_attention_states_ref(
    o: torch.Tensor,
    lse: torch.Tensor,
    part_o: torch.Tensor,
    part_lse: torch.Tensor,
    idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, out of place: (merged o, merged lse)."""
    idx = idx.long()
    a, b = lse[idx], part_lse
    merged_lse = torch.logaddexp(a, b)
    wa, wb = (a - merged_lse).exp()[..., None], (b - merged_lse).exp()[..., None]
    o, lse = o.clone(), lse.clone()
    o[idx] = o[idx] * wa + part_o * wb
    lse[idx] = merged_lse
    return o, lse
