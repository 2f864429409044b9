"""Turns a Step's slices into a ForwardBatch (tensors on the device, extend slices first).

Built in two halves so the host work can run ahead of the device: `plan_batch` needs only the
slices (host tensors, no engine state), `materialize` moves them to the device and reads what
only exists at forward time — the KV slot of each token from the table, and the token sampled by
the previous step for slices that use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch

from services.executor.forward_batch import ForwardBatch, SharedSpans
from services.executor.kv_pool import RequestToTokenTable
from services.executor.prompt_logprobs import PromptPlan, plan_prompt
from services.executor.step import SharedPrefix, Slice


@dataclass
class BatchPlan:
    """Host-side (CPU) parts of a ForwardBatch; T tokens over S slices in `order_slices` order."""

    input_ids: torch.Tensor  # [T] int64, 0 where the slice uses the last sampled token
    positions: torch.Tensor  # [T] int64
    row_of_tok: torch.Tensor  # [T] int64, table row of each token
    rows: torch.Tensor  # [S] int64
    starts: torch.Tensor  # [S] int64
    seq_lens: torch.Tensor  # [S] int64
    reuse_tok: torch.Tensor  # [R] int64, tokens taken from the last sampled buffer
    reuse_rows: torch.Tensor  # [R] int64, their rows
    sample_idx: torch.Tensor  # [num_sampled] int64, token indices whose logits are sampled
    num_extend: int
    extend_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    shared: SharedSpans | None = None  # host tensors, moved to the device by `materialize`
    prompt: PromptPlan | None = None  # positions whose prompt logprobs the step returns


def order_slices(slices: list[Slice]) -> list[int]:
    """Indices of `slices` with the extend slices (length > 1) first, then the decodes."""
    extend = [i for i, s in enumerate(slices) if s.length > 1]
    decode = [i for i, s in enumerate(slices) if s.length == 1]
    return extend + decode


def _int64(values: list[int]) -> torch.Tensor:
    """A host tensor [len(values)] int64."""
    return torch.tensor(values, dtype=torch.int64)


def plan_batch(slices: list[Slice], shared_prefixes: list[SharedPrefix] | None = None) -> BatchPlan:
    """`slices` must already be ordered by `order_slices` and non-empty; `shared_prefixes`
    already validated against them."""
    # Built from Python lists: a step's index vectors are short, and torch's repeat_interleave
    # took 0.5-2 ms a call here while the forward's threads were waking (measured in
    # `radixserve serve`), as long as a quarter of a step's host work.
    lens = [s.length for s in slices]
    starts_cpu = [s.start for s in slices]
    num_extend = sum(1 for n in lens if n > 1)
    ends = list(itertools.accumulate(lens))
    ids = [t for s in slices for t in (s.input_ids if not s.use_last_sampled else [0])]
    reuse = [i for i, s in enumerate(slices) if s.use_last_sampled]
    seq_lens_cpu = [a + n for a, n in zip(starts_cpu, lens, strict=True)]
    t = _int64
    return BatchPlan(
        input_ids=t(ids),
        positions=t([p for s in slices for p in range(s.start, s.start + s.length)]),
        row_of_tok=t([s.row for s in slices for _ in range(s.length)]),
        rows=t([s.row for s in slices]),
        starts=t(starts_cpu),
        seq_lens=t(seq_lens_cpu),
        reuse_tok=t([ends[i] - 1 for i in reuse]),
        reuse_rows=t([slices[i].row for i in reuse]),
        sample_idx=t([ends[i] - 1 for i, s in enumerate(slices) if s.sample]),
        num_extend=num_extend,
        extend_lens_cpu=lens[:num_extend],
        seq_lens_cpu=seq_lens_cpu,
        shared=plan_shared(slices, ends, shared_prefixes or []),
        prompt=plan_prompt(slices, ends),
    )


def plan_shared(
    slices: list[Slice], ends: list[int], spans: list[SharedPrefix]
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
    t = _int64
    return SharedSpans(
        tok_idx=t(tok_idx),
        tok_offsets=t(offsets),
        rows=t([span.rows[0] for span in spans]),
        lens=t([span.length for span in spans]),
        key_starts=t(key_starts),
        max_group_tokens=max(b - a for a, b in itertools.pairwise(offsets)),
    )


def _to_device(shared: SharedSpans | None, device: torch.device) -> SharedSpans | None:
    if shared is None:
        return None
    moved = {f.name: getattr(shared, f.name) for f in fields(shared)}
    return SharedSpans(
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
    )


def materialize(
    plan: BatchPlan, table: RequestToTokenTable, last_sampled: torch.Tensor, device: torch.device
) -> ForwardBatch:
    """The ForwardBatch of `plan` on `device`; `last_sampled`: [max_rows] int64 on `device`."""
    input_ids = plan.input_ids.to(device)
    positions = plan.positions.to(device)
    if plan.reuse_tok.numel():
        input_ids[plan.reuse_tok.to(device)] = last_sampled[plan.reuse_rows.to(device)]
    return ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        out_cache_loc=table.table[plan.row_of_tok.to(device), positions],
        rows=plan.rows.to(device),
        starts=plan.starts.to(device),
        seq_lens=plan.seq_lens.to(device),
        num_extend=plan.num_extend,
        num_extend_tokens=sum(plan.extend_lens_cpu),
        extend_lens_cpu=plan.extend_lens_cpu,
        seq_lens_cpu=plan.seq_lens_cpu,
        sample_token_idx=plan.sample_idx.to(device),
        shared=_to_device(plan.shared, device),
        prompt_token_idx=plan.prompt.token_idx.to(device) if plan.prompt is not None else None,
    )


def build_batch(
    slices: list[Slice],
    table: RequestToTokenTable,
    last_sampled: torch.Tensor,
    device: torch.device,
    shared_prefixes: list[SharedPrefix] | None = None,
) -> ForwardBatch:
    """`slices` must already be ordered by `order_slices`; `last_sampled`: [max_rows] int64."""
    return materialize(plan_batch(slices, shared_prefixes), table, last_sampled, device)
