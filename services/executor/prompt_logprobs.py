"""Prompt logprobs: the log-softmax of a prefill slice's own logits at the prompt's next tokens.

A slice with `logprob_start` asks for the logprob of the token after each of its positions from
that one on (the next input id, and `next_token_id` after its last position), as loglikelihood
evaluation and `echo` need. The forward returns those positions' logits after the sampled ones
(`ForwardBatch.prompt_token_idx`); they are the model's raw distribution, in float32, with none of
the sampler's bias, penalties, temperature or grammar mask. The log-softmax and top-k run over
pieces of at most PIECE_FLOATS logits, so a long chunk adds no further [positions, vocab] tensor
to the one the forward returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.executor.step import PromptLogprobs, Slice

PIECE_FLOATS = 1 << 24  # logits per piece of the log-softmax (64 MiB in float32)


@dataclass
class PromptPlan:
    """Host-side positions of a batch's prompt logprobs; F flagged slices in batch order."""

    token_idx: torch.Tensor  # [P] int64, indices into the batch's tokens, slice by slice
    targets: torch.Tensor  # [P] int64, the token whose logprob each position gives
    rows: list[int]  # [F] table row of each flagged slice
    counts: list[int]  # [F] positions of each flagged slice (they sum to P)


def plan_prompt(slices: list[Slice], ends: list[int]) -> PromptPlan | None:
    """The prompt-logprob positions of `slices` (batch order) whose tokens end at `ends` ([S]);
    None when no slice asks for them."""
    idx: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    counts: list[int] = []
    for s, end in zip(slices, ends, strict=True):
        positions = s.prompt_positions
        if not positions:
            continue
        first = end - s.length  # batch index of the slice's first token
        idx += [first + p - s.start for p in positions]
        following = [*s.input_ids, s.next_token_id] if s.next_token_id is not None else s.input_ids
        targets += following[positions.start - s.start + 1 : positions.stop - s.start + 1]
        rows.append(s.row)
        counts.append(len(positions))
    if not rows:
        return None
    return PromptPlan(
        torch.tensor(idx, dtype=torch.int64),
        torch.tensor(targets, dtype=torch.int64),
        rows,
        counts,
    )


def prompt_logprobs(
    logits: torch.Tensor, plan: PromptPlan, top_counts: list[int]
) -> list[PromptLogprobs]:
    """Per flagged slice of `plan` (`top_counts[f]` alternatives each), from `logits`
    ([P, vocab] float32, the positions of `plan.token_idx` in order)."""
    vocab = logits.shape[-1]
    targets = plan.targets.to(logits.device)
    k = max(top_counts)
    per_piece = max(1, PIECE_FLOATS // vocab)
    chosen, top_vals, top_ids = [], [], []
    for a in range(0, logits.shape[0], per_piece):
        lp = torch.log_softmax(logits[a : a + per_piece], dim=-1)  # [c, vocab]
        chosen.append(lp.gather(1, targets[a : a + per_piece, None]).squeeze(1))
        if k:
            vals, ids = lp.topk(k, dim=-1)
            top_vals.append(vals)
            top_ids.append(ids)
    values = torch.cat(chosen).cpu().tolist()
    tops = (torch.cat(top_ids).cpu().tolist(), torch.cat(top_vals).cpu().tolist()) if k else None
    out, offset = [], 0
    for row, n, kr in zip(plan.rows, plan.counts, top_counts, strict=True):
        piece = PromptLogprobs(row, values[offset : offset + n])
        if tops is not None and kr:
            for ids, vals in zip(
                tops[0][offset : offset + n], tops[1][offset : offset + n], strict=True
            ):
                piece.top_ids += ids[:kr]
                piece.top_logprobs += vals[:kr]
        out.append(piece)
        offset += n
    return out
