"""Per-row token counts for presence / frequency / repetition penalties, kept on the device.

Only rows whose sampling params have a penalty hold a slot here, so the state is a few rows of
`[vocab]` even when `max_running_requests` is large. A slot is filled once when its row is added
(prompt presence, and the counts of output ids the request already has, e.g. after retraction)
and then updated by a scatter of each newly sampled token; nothing is rebuilt from Python lists.
"""

from __future__ import annotations

import torch

from services.executor.sampling_params import SamplingParams


def needs_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.has_penalties


def counts_from_lists(ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(ids), V] float32 counts of each token id in each list."""
    counts = torch.zeros((len(ids), vocab_size), dtype=torch.float32, device=device)
    for i, x in enumerate(ids):
        if x:
            t = torch.tensor(x, dtype=torch.int64, device=device)
            counts[i].index_add_(0, t, torch.ones_like(t, dtype=torch.float32))
    return counts


class PenaltyState:
    """counts[slot, v]: how often the row holding `slot` sampled token v (float32, exact to 2^24);
    prompt[slot, v]: v occurs in that row's prompt. Grows by doubling; slots are reused."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device
        self.slot_of: dict[int, int] = {}
        self.free: list[int] = []
        self.counts = torch.zeros((0, vocab_size), dtype=torch.float32, device=device)
        self.prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)

    def add(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        """Tracks `row` (which must not be tracked yet) from its prompt and existing output."""
        assert row not in self.slot_of, f"row {row} already tracked"
        slot = self._take_slot()
        self.slot_of[row] = slot
        self.counts[slot].zero_()
        self.prompt[slot].zero_()
        if prompt_ids:
            self.prompt[slot, self._ids(prompt_ids)] = True
        if output_ids:
            out = self._ids(output_ids)
            self.counts[slot].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))

    def release(self, row: int) -> None:
        slot = self.slot_of.pop(row, None)
        if slot is not None:
            self.free.append(slot)

    def clear(self) -> None:
        self.free.extend(self.slot_of.values())
        self.slot_of.clear()

    def tracks(self, row: int | None) -> bool:
        return row is not None and row in self.slot_of

    def record(self, rows: list[int | None], token_ids: torch.Tensor) -> None:
        """Counts token_ids[i] ([S] int64, on the device) for each tracked rows[i]."""
        sel = [i for i, r in enumerate(rows) if self.tracks(r)]
        if not sel:
            return
        slots = self._ids([self.slot_of[rows[i]] for i in sel])  # type: ignore[index]
        tokens = token_ids[self._ids(sel)] if len(sel) < len(rows) else token_ids
        ones = torch.ones(len(sel), dtype=torch.float32, device=self.device)
        self.counts.index_put_((slots, tokens), ones, accumulate=True)

    def gather(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [n, V] float32, seen [n, V] bool: in the prompt or sampled) of tracked rows."""
        slots = self._ids([self.slot_of[r] for r in rows])
        counts = self.counts[slots]
        return counts, self.prompt[slots] | (counts > 0)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    def _take_slot(self) -> int:
        if not self.free:
            cap = self.counts.shape[0]
            grow = max(4, cap)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab_size)])
            self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(grow, self.vocab_size)])
            self.free.extend(range(cap + grow - 1, cap - 1, -1))
        return self.free.pop()
