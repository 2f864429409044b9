"""Turns a Step's slices into a ForwardBatch (tensors on the device, extend slices first)."""

from __future__ import annotations

import torch

from services.executor.forward_batch import ForwardBatch, SharedSpans
from services.executor.kv_pool import RequestToTokenTable
from services.executor.step import SharedPrefix, Slice


def order_slices(slices: list[Slice]) -> list[int]:
    """Indices of `slices` with the extend slices (length > 1) first, then the decodes."""
    extend = [i for i, s in enumerate(slices) if s.length > 1]
    decode = [i for i, s in enumerate(slices) if s.length == 1]
    return extend + decode


def build_batch(
    slices: list[Slice],
    table: RequestToTokenTable,
    last_sampled: torch.Tensor,
    device: torch.device,
    shared_prefixes: list[SharedPrefix] | None = None,
) -> ForwardBatch:
    """`slices` must already be ordered by `order_slices`; `last_sampled`: [max_rows] int64."""
    lens = [s.length for s in slices]
    starts_cpu = [s.start for s in slices]
    num_extend = sum(1 for n in lens if n > 1)
    ids = [t for s in slices for t in (s.input_ids if not s.use_last_sampled else [0])]
    input_ids = torch.tensor(ids, dtype=torch.int64)
    rows = torch.tensor([s.row for s in slices], dtype=torch.int64)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    starts = torch.tensor(starts_cpu, dtype=torch.int64)
    ends = torch.cumsum(lens_t, 0)
    # positions[t] = start of t's slice + offset of t within the slice
    slice_of_tok = torch.repeat_interleave(torch.arange(len(slices)), lens_t)
    positions = torch.arange(int(ends[-1])) - (ends - lens_t)[slice_of_tok] + starts[slice_of_tok]
    input_ids, positions, rows = input_ids.to(device), positions.to(device), rows.to(device)
    reuse = [i for i, s in enumerate(slices) if s.use_last_sampled]
    if reuse:
        tok = (ends - 1)[reuse].to(device)
        input_ids[tok] = last_sampled[rows[reuse]]
    row_of_tok = rows[slice_of_tok.to(device)]
    sample_idx = [int(ends[i]) - 1 for i, s in enumerate(slices) if s.sample]
    seq_lens_cpu = [a + n for a, n in zip(starts_cpu, lens, strict=True)]
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_cache_loc=table.table[row_of_tok, positions],
        rows=rows,
        starts=starts.to(device),
        seq_lens=(starts + lens_t).to(device),
        num_extend=num_extend,
        num_extend_tokens=sum(lens[:num_extend]),
        extend_lens_cpu=lens[:num_extend],
        seq_lens_cpu=seq_lens_cpu,
        sample_token_idx=torch.tensor(sample_idx, dtype=torch.int64, device=device),
        shared=build_shared(slices, ends.tolist(), shared_prefixes or [], device),
    )


def build_shared(
    slices: list[Slice], ends: list[int], spans: list[SharedPrefix], device: torch.device
) -> SharedSpans | None:
    """Token groups of `spans` (validated) over `slices` whose tokens end at `ends` ([S])."""
    if not spans:
        return None
    index = {s.row: i for i, s in enumerate(slices)}
    key_starts = [0] * len(slices)
    tok_idx: list[int] = []
    offsets = [0]
    for span in spans:
        for row in span.rows:
            i = index[row]
            key_starts[i] = span.length
            tok_idx += range(ends[i] - slices[i].length, ends[i])
        offsets.append(len(tok_idx))

    def t(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return SharedSpans(
        tok_idx=t(tok_idx),
        tok_offsets=t(offsets),
        rows=t([span.rows[0] for span in spans]),
        lens=t([span.length for span in spans]),
        key_starts=t(key_starts),
    )
