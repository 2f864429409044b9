"""Shared-prefix (cascade) attention on the CPU: the C++ entry points of attention.cpp that return
partial outputs with their log-sum-exps, and the merge that combines two partial attentions.

Rows that share a cached prefix attend it once per group (`shared_prefix_attention`), then each
row's own keys (`paged_decode_attention_lse`, `extend_attention_lse`, keys from `key_starts`); the
parts merge exactly by log-sum-exp (`merge_attention_states_`):
    out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}).
Every kernel has a one-request-at-a-time `*_ref` in plain PyTorch beside it. Outputs are float32.

`grouped_decode_attention` takes decode rows in groups and returns what `paged_decode_attention`
returns for them, the same values: on CPUs with AVX2 but no AVX-512 (`reads_spans_once`) each
group's span is read once for up to 8 of its rows, and no merge is needed.
"""

from __future__ import annotations

import torch

from kernels.cpu import (
    _check_pools,
    _module_or_raise,
    avx2_attention,
    check_decode_args,
    extend_module,
    paged_decode_attention_ref,
)


def _check_index(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.int64 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor")


def _attend_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [n, H, D]; k, v: [L, Hkv, D]; visible: [n, L] bool → out [n, H, D], lse [n, H] (float32)
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,lhd->qhl", q.float(), k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("qhl,lhd->qhd", (scores - lse[..., None]).exp(), v)
    return out, lse


def paged_decode_attention_lse(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    key_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, D]; request b attends positions key_starts[b] .. seq_lens[b]-1 of table row
    rows[b] (key_starts[b] < seq_lens[b]). → out [B, H, D], lse [B, H], float32."""
    _check_pools(q, k_pool, v_pool, table)
    _check_index(rows=rows, key_starts=key_starts, seq_lens=seq_lens)
    if not rows.shape == key_starts.shape == seq_lens.shape == q.shape[:1]:
        raise ValueError("rows, key_starts and seq_lens need one entry per query")
    out, lse = _module_or_raise().paged_decode_attention_lse(
        q.contiguous(), k_pool, v_pool, table, rows, key_starts, seq_lens, scale
    )
    return out, lse


def paged_decode_attention_lse_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    key_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    for b in range(q.shape[0]):
        slots = table[rows[b], int(key_starts[b]) : int(seq_lens[b])]
        out[b : b + 1], lse[b : b + 1] = _attend_ref(
            q[b : b + 1], k_pool[slots], v_pool[slots], scale, None
        )
    return out, lse


def reads_spans_once(head_dim: int) -> bool:
    """Whether `grouped_decode_attention` reads each group's span once for its rows on this CPU
    (where the AVX2 kernels run: `avx2_attention`); elsewhere it attends row by row."""
    return avx2_attention(head_dim)


def grouped_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention as `paged_decode_attention` (q: [B, H, D]; request b attends positions
    0 .. seq_lens[b]-1 of table row rows[b]; → [B, H, D] in q's dtype), with the requests
    order[offsets[g] : offsets[g+1]] (indices into the batch; order [N], offsets [G+1], spans
    [G], int64) in groups whose table rows start with the same spans[g] slots (1 <= spans[g] <=
    each member's seq_len). The outputs are bit for bit those of `paged_decode_attention`; where
    `reads_spans_once`, each span is read once per kv head for up to 8 members of its group.
    Raises ValueError for bad arguments or members whose span slots differ (this wrapper compares
    them; the executor, which checks its spans when a Step arrives, calls the kernel directly),
    RuntimeError (from the kernel) for bad indices or lengths."""
    check_decode_args(q, k_pool, v_pool, table, rows, seq_lens)
    _check_index(order=order, offsets=offsets, spans=spans)
    if offsets.shape[0] != spans.shape[0] + 1:
        raise ValueError("offsets needs one entry more than spans")
    out = _module_or_raise().grouped_decode_attention(  # checks the indices the loop uses
        q.contiguous(), k_pool, v_pool, table, rows, seq_lens, order, offsets, spans, scale
    )
    for g, span in enumerate(spans.tolist()):
        members = rows[order[int(offsets[g]) : int(offsets[g + 1])]]
        prefixes = table[members, :span]
        if not bool((prefixes == prefixes[:1]).all()):
            raise ValueError(f"group {g}: its rows' first {span} slots differ")
    return out


def grouped_decode_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
    spans: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # The groups change which reads are shared, not what is computed.
    return paged_decode_attention_ref(q, k_pool, v_pool, table, rows, seq_lens, scale)


def extend_attention_lse(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    key_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], request b's extend_lens[b] new tokens back to back, at positions
    prefix_lens[b] .. of row rows[b]; each sees positions key_starts[b] .. its own (causal;
    key_starts[b] <= prefix_lens[b]). head_dim a multiple of 64. → out [T, H, D], lse [T, H]."""
    _check_pools(q, k_pool, v_pool, table)
    if q.shape[2] % 64:
        raise ValueError(f"head_dim must be a multiple of 64, not {q.shape[2]}")
    _check_index(rows=rows, key_starts=key_starts, prefix_lens=prefix_lens, extend_lens=extend_lens)
    if not rows.shape == key_starts.shape == prefix_lens.shape == extend_lens.shape:
        raise ValueError("rows, key_starts, prefix_lens and extend_lens need one entry each")
    out, lse = extend_module(q, k_pool).extend_attention_lse(
        q.contiguous(), k_pool, v_pool, table, rows, key_starts, prefix_lens, extend_lens, scale
    )
    return out, lse


def extend_attention_lse_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    key_starts: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    first = 0
    for b in range(rows.shape[0]):
        ks, prefix, n = int(key_starts[b]), int(prefix_lens[b]), int(extend_lens[b])
        slots = table[rows[b], ks : prefix + n]
        key_pos = torch.arange(ks, prefix + n)
        visible = key_pos[None, :] <= (prefix + torch.arange(n))[:, None]
        part = slice(first, first + n)
        out[part], lse[part] = _attend_ref(q[part], k_pool[slots], v_pool[slots], scale, visible)
        first += n
    return out, lse


def shared_prefix_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    group_rows: torch.Tensor,
    tok_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [N, H, D], the query tokens of G groups back to back (group g: tok_offsets[g] ..
    tok_offsets[g+1]-1, tok_offsets: [G+1]); every token of group g attends positions
    0 .. prefix_lens[g]-1 (>= 1) of table row group_rows[g], read once per group.
    head_dim a multiple of 64. → out [N, H, D], lse [N, H], float32."""
    _check_pools(q, k_pool, v_pool, table)
    if q.shape[2] % 64:
        raise ValueError(f"head_dim must be a multiple of 64, not {q.shape[2]}")
    _check_index(group_rows=group_rows, tok_offsets=tok_offsets, prefix_lens=prefix_lens)
    if group_rows.shape != prefix_lens.shape or tok_offsets.shape[0] != group_rows.shape[0] + 1:
        raise ValueError("group_rows and prefix_lens: [G]; tok_offsets: [G + 1]")
    out, lse = extend_module(q, k_pool).shared_prefix_attention(
        q.contiguous(), k_pool, v_pool, table, group_rows, tok_offsets, prefix_lens, scale
    )
    return out, lse


def shared_prefix_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    group_rows: torch.Tensor,
    tok_offsets: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(q.shape, dtype=torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    for g in range(group_rows.shape[0]):
        slots = table[group_rows[g], : int(prefix_lens[g])]
        part = slice(int(tok_offsets[g]), int(tok_offsets[g + 1]))
        out[part], lse[part] = _attend_ref(q[part], k_pool[slots], v_pool[slots], scale, None)
    return out, lse


def merge_attention_states_(
    out: torch.Tensor,
    lse: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """Merges part_out [N, H, D] / part_lse [N, H] (the queries of tokens idx [N] over other
    keys) into out [T, H, D] / lse [T, H] in place; all float32 and contiguous. Returns out."""
    for name, t in (("out", out), ("lse", lse), ("part_out", part_out), ("part_lse", part_lse)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32")
    _check_index(idx=idx)
    if part_out.shape[1:] != out.shape[1:] or part_out.shape[0] != idx.shape[0]:
        raise ValueError(f"shapes: out {tuple(out.shape)}, part_out {tuple(part_out.shape)}")
    _module_or_raise().merge_attention_states_(out, lse, part_out, part_lse, idx)
    return out


def merge_attention_states_ref(
    out: torch.Tensor,
    lse: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """The same, out of place, in plain PyTorch (also the no-compiler fallback)."""
    a, b = lse[idx], part_lse
    merged_lse = torch.logaddexp(a, b)
    merged = (
        out[idx] * (a - merged_lse).exp()[..., None] + part_out * (b - merged_lse).exp()[..., None]
    )
    out = out.clone()
    out[idx] = merged
    return out
